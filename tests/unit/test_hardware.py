"""GPU labels, health rules and the free-VRAM gate (pure code; NVML itself is in integration)."""

from __future__ import annotations

import pytest

from agent.hardware import GIB, gpu_labels, model_label, vram_class
from agent.health import GpuPolicy, GpuState, assess
from agent.nvml import Gpu, GpuReading, Inventory, throttle_names
from agent.protocol.messages import GpuInfo


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA GeForce RTX 4090", "rtx-4090"),
        ("NVIDIA GeForce RTX 3080 Ti", "rtx-3080-ti"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("Tesla T4", "t4"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("NVIDIA RTX A6000", "rtx-a6000"),
        ("NVIDIA RTX 6000 Ada Generation", "rtx-6000-ada"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA A10G", "a10g"),
        ("Quadro RTX 8000", "rtx-8000"),
    ],
)
def test_model_label_normalises_marketing_names(name: str, label: str) -> None:
    """GPU names become short model labels without vendor, memory size or form factor."""
    assert model_label(name) == label


def test_model_label_is_none_for_names_with_nothing_left() -> None:
    """A name made only of vendor words or symbols yields no label at all."""
    assert model_label("NVIDIA") is None
    assert model_label("") is None
    assert model_label("%%% ///") is None


def test_model_label_never_exceeds_the_label_rule() -> None:
    """A hostile, very long name still yields a valid label of at most 63 characters."""
    label = model_label("X" * 500 + " ünïcode \x00 ../../etc")
    assert label is not None
    assert len(label) <= 63
    assert label[0].isalnum()


def test_vram_class_rounds_to_whole_gib() -> None:
    """NVML's slightly-under totals round to the marketed size; no VRAM gives no class."""
    assert vram_class(81_559 * 1024**2) == "vram-80gb"  # H100 80GB as NVML reports it
    assert vram_class(24_564 * 1024**2) == "vram-24gb"  # RTX 4090
    assert vram_class(0) is None


def test_gpu_labels_name_every_model_and_the_largest_vram() -> None:
    """Mixed GPUs give gpu, one label per model and the VRAM class of the largest."""
    gpus = [
        GpuInfo(index=0, name="NVIDIA GeForce RTX 4090", vram_total=24 * GIB),
        GpuInfo(index=1, name="NVIDIA H100 80GB HBM3", vram_total=80 * GIB),
        GpuInfo(index=2, name="NVIDIA GeForce RTX 4090", vram_total=24 * GIB),
    ]
    assert gpu_labels(gpus) == ("gpu", "rtx-4090", "h100", "vram-80gb")
    assert gpu_labels([]) == ()


def test_throttle_names_decode_known_and_unknown_bits() -> None:
    """Throttle bits are named; bits NVML may add later are kept as hex."""
    assert throttle_names(0) == ()
    assert throttle_names(0x1 | 0x40) == ("gpu_idle", "hw_thermal_slowdown")
    assert throttle_names(0x8 | 0x10000) == ("hw_slowdown", "0x10000")


GPU = Gpu(index=0, uuid="GPU-1", name="NVIDIA H200", vram_total=140 * GIB)
POLICY = GpuPolicy(max_temperature_c=85)


def test_a_cool_error_free_gpu_is_usable() -> None:
    """A GPU below the temperature limit without ECC errors has no problem."""
    reading = GpuReading(index=0, temperature_c=84.9, ecc_uncorrected=0, vram_free=GIB)
    assert assess(GPU, reading, POLICY) is None
    assert assess(GPU, None, POLICY) is None


def test_a_hot_gpu_is_not_offered_work() -> None:
    """At the temperature limit the GPU is refused, naming the reading and the setting."""
    reason = assess(GPU, GpuReading(index=0, temperature_c=85), POLICY)
    assert reason is not None
    assert "too hot" in reason
    assert "85" in reason
    assert "gpu.max_temperature_c" in reason


def test_uncorrectable_ecc_errors_and_a_lost_gpu_are_problems() -> None:
    """Uncorrectable ECC errors and a GPU fallen off the bus each make it unusable."""
    ecc = assess(GPU, GpuReading(index=0, ecc_uncorrected=3), POLICY)
    assert ecc is not None
    assert "3 uncorrectable ECC" in ecc
    lost = assess(GPU, GpuReading(index=0, lost=True), POLICY)
    assert lost is not None
    assert "fallen off the bus" in lost
    at_start = assess(Gpu(index=1, lost=True), None, POLICY)
    assert at_start is not None
    assert "GPU 1" in at_start


def _state(free: list[int], problems: dict[int, str] | None = None) -> GpuState:
    gpus = tuple(Gpu(index=i, name=f"G{i}", vram_total=80 * GIB) for i in range(len(free)))
    readings = tuple(GpuReading(index=i, vram_free=f) for i, f in enumerate(free))
    return GpuState(inventory=Inventory(gpus=gpus), readings=readings, problems=problems or {})


def test_vram_gate_needs_one_usable_gpu_with_enough_free_memory() -> None:
    """A task fits when one usable GPU has the free VRAM it needs; unusable ones do not count."""
    state = _state([4 * GIB, 30 * GIB])
    assert state.vram_refusal(0) is None
    assert state.vram_refusal(24) is None
    refusal = state.vram_refusal(40)
    assert refusal is not None
    assert "40 GiB" in refusal
    assert "30.0 GiB" in refusal
    hot = _state([4 * GIB, 30 * GIB], problems={1: "too hot"})
    assert hot.vram_refusal(24) is not None
    assert [g.index for g in hot.gpu_infos()] == [0]


def test_vram_gate_defers_to_the_gateway_without_nvml() -> None:
    """Without an NVML inventory the agent does not second-guess the scheduler's VRAM fit."""
    assert GpuState(nvml="no driver").vram_refusal(16) is None


def test_all_unusable_only_when_gpus_exist_and_none_is_usable() -> None:
    """A CPU-only machine is not unhealthy; a GPU machine with every GPU broken is."""
    assert not GpuState().all_unusable
    assert not _state([GIB, GIB], problems={0: "hot"}).all_unusable
    assert _state([GIB, GIB], problems={0: "hot", 1: "lost"}).all_unusable


def test_snapshots_carry_every_gpu_with_its_problem() -> None:
    """Heartbeat snapshots list unusable GPUs too, each with why it is not offered work."""
    state = _state([GIB, 2 * GIB], problems={1: "GPU 1 is too hot: 99 °C"})
    snapshots = state.snapshots()
    assert [s.index for s in snapshots] == [0, 1]
    assert snapshots[0].problem is None
    assert snapshots[1].problem == "GPU 1 is too hot: 99 °C"
    assert snapshots[1].memory_free == 2 * GIB

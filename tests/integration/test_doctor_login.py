"""``cyberun-agent doctor`` and ``cyberun-agent login`` as real processes against a real gateway.

The gateway is a real ``cyberun-gateway serve`` process; doctor's GPU checks read the compiled
fake NVML (tests/nvml_fake.py) so their verdict does not depend on the host.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.doctor import check_clock
from tests.agent_process import ROOT, agent_cli
from tests.comfyui import ComfyUIServer
from tests.gateway_process import GatewayProcess, gateway, run_cli
from tests.nerfstudio import NerfstudioInstall
from tests.nvml_fake import FakeGpu, nvml_env, write_scenario
from tests.streams import Lines

GIB = 1024**3
KEY = re.compile(r"\b(?:dk|ak|sk)-[A-Za-z0-9_-]{20,}")


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[GatewayProcess]:
    """A fresh gateway (device codes valid 300 s)."""
    with gateway(tmp_path / "gw") as proc:
        yield proc


def agent_env(home: Path, gateway_url: str, **extra: str) -> dict[str, str]:
    """A clean environment for an agent command with its own state, work and cache dirs."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "PYTHONPATH": str(ROOT),
        "CYBERUN_AGENT_GATEWAY_URL": gateway_url,
        "CYBERUN_AGENT_STATE_DIR": str(home / "state"),
        "CYBERUN_AGENT_CACHE_DIR": str(home / "cache"),
        "CYBERUN_AGENT_WORK_DIR": str(home / "work"),
        "CYBERUN_AGENT_LIMITS__MIN_FREE_DISK_BYTES": "1024",
        **extra,
    }


def doctor(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``cyberun-agent doctor --json``: exit code, the report by check name, stderr."""
    done = agent_cli("doctor", "--json", *args, env=env, timeout=90)
    report = json.loads(done.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert report["ok"] == (done.returncode == 0)
    return done.returncode, by_name, done.stderr


@pytest.fixture
def healthy_gpu(fake_nvml_lib: Path, tmp_path: Path) -> dict[str, str]:
    """Environment pointing NVML at one healthy fake GPU."""
    gpu = FakeGpu(name="NVIDIA GeForce RTX 4090", total=24 * GIB, temp=40)
    return nvml_env(fake_nvml_lib, write_scenario(tmp_path / "nvml.txt", [gpu]))


def test_doctor_passes_with_a_good_key(
    tmp_path: Path, gw: GatewayProcess, healthy_gpu: dict[str, str]
) -> None:
    """A good key: the handshake succeeds, the clock agrees, every check but runtimes is ok."""
    dk = gw.credential("team-doc")
    env = agent_env(tmp_path / "home", gw.url, CYBERUN_AGENT_CREDENTIAL=dk, **healthy_gpu)
    code, checks, _ = doctor(env)
    assert code == 0
    assert checks["credential"]["status"] == "ok"
    assert checks["credential"]["detail"].startswith("dk-… from env CYBERUN_AGENT_CREDENTIAL")
    assert checks["gateway"]["status"] == "ok"
    assert "credential accepted" in checks["gateway"]["detail"]
    assert checks["clock"]["status"] == "ok"
    assert checks["gpu"]["status"] == "ok"
    assert "NVIDIA GeForce RTX 4090, 24 GiB" in checks["gpu 0"]["detail"]
    assert checks["runtimes"]["status"] == "warn"  # none configured: said, not fatal
    for name in ("config", "disk work_dir", "disk cache_dir", "state_dir"):
        assert checks[name]["status"] == "ok", checks[name]
    assert dk not in json.dumps(checks)


def test_doctor_fails_on_a_revoked_key(
    tmp_path: Path, gw: GatewayProcess, healthy_gpu: dict[str, str]
) -> None:
    """A revoked key fails the gateway check through the real handshake's 401, exit 1."""
    dk = gw.credential("team-doc")
    run_cli("credentials", "revoke", "--data-dir", str(gw.data_dir), "--prefix", dk[:10])
    env = agent_env(tmp_path / "home", gw.url, CYBERUN_AGENT_CREDENTIAL=dk, **healthy_gpu)
    code, checks, _ = doctor(env)
    assert code == 1
    gateway_check = checks["gateway"]
    assert gateway_check["status"] == "fail"
    assert "refused the credential (HTTP 401)" in gateway_check["detail"]
    assert "cyberun-agent login" in gateway_check["fix"]
    assert "clock" not in checks


def test_doctor_fails_on_an_unreachable_gateway(
    tmp_path: Path, healthy_gpu: dict[str, str]
) -> None:
    """A gateway URL nobody listens on fails the gateway check with what to look at."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again before doctor runs
    dk = "dk-" + "x" * 40
    env = agent_env(tmp_path / "home", url, CYBERUN_AGENT_CREDENTIAL=dk, **healthy_gpu)
    code, checks, _ = doctor(env)
    assert code == 1
    assert checks["gateway"]["status"] == "fail"
    assert checks["gateway"]["detail"].startswith(f"cannot reach {url}")
    assert checks["credential"]["status"] == "ok"


def test_doctor_reports_an_unhealthy_gpu_and_a_dead_comfyui(
    tmp_path: Path, gw: GatewayProcess, fake_nvml_lib: Path
) -> None:
    """A GPU with ECC errors and a ComfyUI that does not answer each fail with their fix."""
    gpus = [FakeGpu(name="NVIDIA H100 80GB HBM3", total=80 * GIB, ecc_uncorrected=4), FakeGpu()]
    nvml = nvml_env(fake_nvml_lib, write_scenario(tmp_path / "nvml.txt", gpus))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        comfyui = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = agent_env(
        tmp_path / "home",
        gw.url,
        CYBERUN_AGENT_CREDENTIAL=gw.credential("team-doc"),
        CYBERUN_AGENT_RUNTIMES__COMFYUI__URL=comfyui,
        **nvml,
    )
    code, checks, _ = doctor(env)
    assert code == 1
    assert checks["gpu 0"]["status"] == "fail"
    assert "4 uncorrectable ECC" in checks["gpu 0"]["detail"]
    assert checks["gpu 0"]["fix"]
    assert checks["gpu 1"]["status"] == "ok"
    assert checks["comfyui"]["status"] == "fail"
    assert checks["comfyui"]["detail"].startswith(f"cannot reach {comfyui}")


def test_doctor_checks_the_real_runtimes(
    tmp_path: Path, comfyui: ComfyUIServer, nerfstudio: NerfstudioInstall
) -> None:
    """A running ComfyUI reports its version; launch paths and the ns-* CLI are found."""
    home = tmp_path / "home"
    attached = agent_env(
        home,
        "http://127.0.0.1:9",
        CYBERUN_AGENT_RUNTIMES__COMFYUI__URL=comfyui.url,
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED="true",
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__BIN_DIR=str(nerfstudio.bin),
    )
    _, checks, _ = doctor(attached)
    assert checks["comfyui"] == {
        "name": "comfyui",
        "status": "ok",
        "detail": f"{comfyui.url}: ComfyUI 0.3.75",
        "fix": "",
    }
    assert checks["nerfstudio"]["status"] == "ok"
    assert str(nerfstudio.bin) in checks["nerfstudio"]["detail"]
    launch = agent_env(
        home,
        "http://127.0.0.1:9",
        CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON=str(comfyui.install.python),
        CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN=str(comfyui.install.main),
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__ENABLED="true",
        CYBERUN_AGENT_RUNTIMES__NERFSTUDIO__BIN_DIR=str(tmp_path),
    )
    _, checks, _ = doctor(launch)
    assert checks["comfyui"]["status"] == "ok"
    assert checks["comfyui"]["detail"].endswith("(ComfyUI 0.3.75)")
    assert checks["nerfstudio"]["status"] == "fail"
    assert checks["nerfstudio"]["detail"] == f"ns-train, ns-export not found in {tmp_path}"


def test_doctor_reports_a_bad_config_and_a_loose_credential_file(tmp_path: Path) -> None:
    """An invalid value is one failing check naming key and source; loose key files warn."""
    home = tmp_path / "home"
    bad = agent_env(home, "http://127.0.0.1:9", CYBERUN_AGENT_SLOTS="zero")
    code, checks, _ = doctor(bad)
    assert code == 1
    assert list(checks) == ["config"]
    assert "slots (from env CYBERUN_AGENT_SLOTS)" in checks["config"]["detail"]
    key = tmp_path / "key"
    key.write_text("dk-" + "y" * 40 + "\n", encoding="utf-8")
    key.chmod(0o644)
    loose = agent_env(home, "http://127.0.0.1:9", CYBERUN_AGENT_CREDENTIAL_FILE=str(key))
    _, checks, _ = doctor(loose)
    assert checks["credential"]["status"] == "warn"
    assert f"chmod 600 {key}" in checks["credential"]["fix"]


def test_doctor_table_shows_each_fix_and_the_verdict(tmp_path: Path) -> None:
    """The human report lists each check, a fix line under what is wrong, and FAILED."""
    env = agent_env(tmp_path / "home", "http://127.0.0.1:9")
    done = agent_cli("doctor", env=env, timeout=90)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    credential = next(i for i, line in enumerate(lines) if line.startswith("credential"))
    assert "FAIL" in lines[credential]
    assert "fix: run `cyberun-agent login`" in lines[credential + 1]
    assert lines[-1].startswith("FAILED")


def test_clock_skew_thresholds() -> None:
    """Skew under 2 s is ok, from 2 s a warning, from 30 s a failure naming time sync."""
    assert check_clock(0.4).status == "ok"
    assert check_clock(-5).status == "warn"
    assert "ahead of the gateway" in check_clock(-5).detail
    late = check_clock(45)
    assert late.status == "fail"
    assert "45.00 s behind" in late.detail
    assert "ntp" in late.fix


# ------------------------------------------------------------------ login


class Login:
    """A running ``cyberun-agent login``; its stdout lines are collected as they come."""

    def __init__(self, env: dict[str, str]) -> None:
        """Start the command."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "login"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.lines = Lines(self.process.stdout)

    def user_code(self, timeout: float = 30) -> str:
        """Wait for the code the command shows."""
        return self.lines.wait(r"approve the code:\s+([A-Z0-9]{4}-[A-Z0-9]{4})\b", timeout).group(1)

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        """Wait for the exit: code, all stdout, stderr."""
        assert self.process.stderr is not None
        code = self.process.wait(timeout=timeout)
        return code, self.lines.rest(), self.process.stderr.read()

    def stop(self) -> None:
        """Kill the command if it still runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def test_login_pairs_and_stores_both_keys_privately(tmp_path: Path, gw: GatewayProcess) -> None:
    """Login shows a code; once approved it stores dk- and ak- (0600), never printing them."""
    home = tmp_path / "home"
    login = Login(agent_env(home, gw.url))
    try:
        code = login.user_code()
        approved = run_cli(
            "pair", "approve", code, "--team", "team-pair", "--data-dir", str(gw.data_dir)
        )
        assert approved.strip() == f"approved {code} for team team-pair"
        exit_code, out, err = login.finish()
    finally:
        login.stop()
    assert exit_code == 0, err
    stored = home / "state" / "credential"
    assert f"paired: the device credential (dk-…) and agent key (ak-…) are in {stored}" in out
    assert f"{gw.url}/pair" in out
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    keys = KEY.findall(stored.read_text(encoding="utf-8"))
    assert [k[:3] for k in keys] == ["dk-", "ak-"]
    assert not KEY.search(out + err)
    with gw.client(keys[0]) as http:
        assert http.get("/r/workflows").status_code == 200  # the dk- works on REST
    code_, checks, _ = doctor(agent_env(home, gw.url, CYBERUN_AGENT_GPU__ENABLED="false"))
    assert checks["credential"]["detail"] == f"ak-… from login credential {stored}"
    assert checks["gateway"]["status"] == "ok", checks["gateway"]  # the ak- connects
    assert code_ == 0


def test_login_gives_up_when_the_code_expires(tmp_path: Path) -> None:
    """A code nobody approves expires: login exits 4 saying so, and stores nothing."""
    with gateway(tmp_path / "gw", "--pair-ttl", "2") as short:
        home = tmp_path / "home"
        login = Login(agent_env(home, short.url))
        try:
            login.user_code()
            exit_code, _, err = login.finish()
        finally:
            login.stop()
    assert exit_code == 4
    assert "expired before it was approved" in err
    assert not (home / "state" / "credential").exists()


def test_login_needs_a_reachable_gateway(tmp_path: Path) -> None:
    """Without a gateway to talk to, login fails at once with exit 1 and the reason."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = agent_cli("login", env=agent_env(tmp_path / "home", url), timeout=60)
    assert done.returncode == 1
    assert "cannot reach the gateway" in done.stderr

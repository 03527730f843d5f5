"""The command line as users run it: a real ``python -m agent`` process per test."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import __version__
from agent.cli import config_template
from agent.errors import ExitCode
from agent.protocol.schema import render_schema
from agent.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DK = "dk-Zq8vR2mXk4T9pLw7Ny3B_Hc6"
AK = "ak-Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8"


@dataclass
class Result:
    """What a finished CLI process left behind."""

    code: int
    out: str
    err: str


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """Return an empty HOME for the process under test."""
    path = tmp_path / "home"
    path.mkdir()
    return path


def _cli(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m agent ARGS`` with a minimal, controlled environment."""
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "PYTHONIOENCODING": "utf-8",
        "LC_ALL": "C.UTF-8",
        **(env or {}),
    }
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args],
        env=environ,
        cwd=home,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=30,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def _config(home: Path, text: str, mode: int = 0o600) -> Path:
    path = home / "cyberun-agent.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def _one_line(result: Result) -> str:
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


# ---------------------------------------------------------------- basics


def test_version_and_help(home: Path) -> None:
    """--version prints the version; --help documents the commands and every exit code."""
    version = _cli(home, "--version")
    assert (version.code, version.out.strip()) == (0, f"cyberun-agent {__version__}")
    helped = _cli(home, "--help")
    assert helped.code == 0
    for command in ("run", "config", "protocol"):
        assert command in helped.out
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}\s+\S", helped.out, re.MULTILINE), code


def test_run_help_has_no_credential_value_flag(home: Path) -> None:
    """There is a --credential-file flag with help explaining why there is no --credential."""
    helped = _cli(home, "run", "--help")
    assert helped.code == 0
    assert "[--credential-file PATH]" in helped.out
    assert "[--credential " not in helped.out
    assert "no --credential flag" in helped.out
    assert "--no-community" in helped.out
    for command in (["run"], ["config", "validate"]):
        # Not even as an abbreviation of --credential-file, which would print the "path".
        rejected = _cli(
            home, *command, "--gateway-url", "https://gw.example.com", "--credential", DK
        )
        assert rejected.code == ExitCode.USAGE, rejected.err
        assert DK[3:] not in rejected.out + rejected.err


def test_usage_errors_exit_2(home: Path) -> None:
    """Unknown commands and flags are argparse usage errors with exit code 2."""
    assert _cli(home, "fly").code == 2
    assert _cli(home, "config", "show", "--bogus").code == 2
    assert _cli(home).code == 2


# ---------------------------------------------------------------- config show


def test_show_reports_values_and_their_sources(home: Path) -> None:
    """The table shows flag > env > file > default with each value's source."""
    config = _config(home, "slots: 1\nregion: file-region\nlog_level: debug\n")
    env = {"CYBERUN_AGENT_SLOTS": "2", "CYBERUN_AGENT_REGION": "env-region"}
    shown = _cli(home, "config", "show", "--config", str(config), "--slots", "3", env=env)
    assert shown.code == 0, shown.err
    rows = {line.split()[0]: line.split() for line in shown.out.splitlines()[2:]}
    assert rows["slots"][1:] == ["3", "flag", "--slots"]
    assert rows["region"][1:] == ["env-region", "env", "CYBERUN_AGENT_REGION"]
    assert rows["log_level"][1:] == ["debug", f"{config}:3"]
    assert rows["timeouts.connect_s"][1:] == ["10.0", "default"]
    assert shown.out.splitlines()[0] == f"config file: {config}"


def test_show_json_has_values_sources_and_derived_endpoint(home: Path) -> None:
    """--json gives every key's value and source, and the derived agent endpoint."""
    shown = _cli(
        home,
        "config",
        "show",
        "--json",
        "--gateway-url",
        "https://gw.example.com/base",
        "--label",
        "Team-A",
        "--label",
        "gpu",
        "--community",
    )
    assert shown.code == 0, shown.err
    document = json.loads(shown.out)
    values = document["settings"]
    assert values["agent_labels"] == {"value": ["team-a", "gpu"], "source": "flag --label"}
    assert values["pools.community.enabled"]["source"] == "flag --community"
    assert values["limits.max_frame_bytes"] == {"value": 1048576, "source": "default"}
    assert document["derived"]["agent_ws_url"] == "wss://gw.example.com/base/agent/v1/ws"
    assert document["derived"]["pools"] == ["team", "community"]


def test_show_never_prints_the_credential(home: Path) -> None:
    """A credential in the file and in the environment appears in neither text nor JSON."""
    config = _config(home, f"credential: {AK}\n")
    env = {"CYBERUN_AGENT_CREDENTIAL": DK}
    text = _cli(home, "config", "show", "--config", str(config), env=env)
    as_json = _cli(home, "config", "show", "--json", "--config", str(config), env=env)
    for result in (text, as_json):
        assert result.code == 0, result.err
        for secret in (DK, AK, DK[3:], AK[3:], DK[3:12]):
            assert secret not in result.out + result.err
    credential = json.loads(as_json.out)["settings"]["credential"]
    assert credential == {
        "value": "<set: dk-…, from env CYBERUN_AGENT_CREDENTIAL>",
        "source": "env CYBERUN_AGENT_CREDENTIAL",
    }


def test_show_describes_a_credential_file_by_kind_only(home: Path) -> None:
    """A credential file is shown as its kind and path, never its content."""
    secret = home / "credential"
    secret.write_text(AK + "\n", encoding="utf-8")
    secret.chmod(0o600)
    shown = _cli(home, "config", "show", "--json", "--credential-file", str(secret))
    assert shown.code == 0, shown.err
    assert AK[3:] not in shown.out
    value = json.loads(shown.out)["settings"]["credential"]["value"]
    assert value == f"<set: ak-…, from credential_file {secret}>"


# ---------------------------------------------------------------- config validate


def test_validate_ok(home: Path) -> None:
    """A complete configuration validates with exit 0 and names the file read."""
    config = _config(home, "gateway_url: https://gw.example.com\n")
    result = _cli(
        home, "config", "validate", "--config", str(config), env={"CYBERUN_AGENT_CREDENTIAL": DK}
    )
    assert (result.code, result.out.strip(), result.err) == (0, f"ok: {config}", "")


def test_validate_without_file_or_gateway_fails_with_config_code(home: Path) -> None:
    """Without a gateway URL validate exits 3 with one line naming gateway_url."""
    result = _cli(home, "config", "validate", env={"CYBERUN_AGENT_CREDENTIAL": DK})
    assert result.code == ExitCode.CONFIG
    assert _one_line(result).startswith("config error: gateway_url (from default): is required")


def test_validate_without_credential_fails_with_credential_code(home: Path) -> None:
    """Without any credential validate exits 4 with one line naming credential."""
    result = _cli(home, "config", "validate", "--gateway-url", "https://gw.example.com")
    assert result.code == ExitCode.CREDENTIAL
    assert _one_line(result).startswith("config error: credential (from default): is required")


def test_malformed_credential_exits_4_without_echoing_it(home: Path) -> None:
    """A malformed credential from the environment exits 4; the value is never printed."""
    bad = "dk-my-REAL-secret-with-a-typo!"
    result = _cli(
        home,
        "config",
        "validate",
        "--gateway-url",
        "https://gw.example.com",
        env={"CYBERUN_AGENT_CREDENTIAL": bad},
    )
    assert result.code == ExitCode.CREDENTIAL
    line = _one_line(result)
    assert "credential (from env CYBERUN_AGENT_CREDENTIAL)" in line
    assert "REAL-secret" not in result.out + result.err


def test_malformed_credential_file_exits_4_without_echoing_it(home: Path) -> None:
    """A credential file holding a malformed value exits 4, naming the file only."""
    secret = home / "credential"
    secret.write_text("sk-integration-key-in-the-wrong-place\n", encoding="utf-8")
    secret.chmod(0o600)
    result = _cli(
        home,
        "config",
        "validate",
        "--gateway-url",
        "https://gw.example.com",
        "--credential-file",
        str(secret),
    )
    assert result.code == ExitCode.CREDENTIAL
    assert str(secret) in _one_line(result)
    assert "integration-key" not in result.err


def test_yaml_syntax_error_is_one_line_with_file_and_line(home: Path) -> None:
    """Broken YAML exits 3 with one stderr line naming FILE:LINE."""
    config = _config(home, "region: eu\ntimeouts:\n  connect_s: [1\n")
    result = _cli(home, "config", "validate", "--config", str(config))
    assert result.code == ExitCode.CONFIG
    assert re.fullmatch(
        rf"config error: yaml syntax \(from {re.escape(str(config))}:\d+\): invalid YAML: .+",
        _one_line(result),
    )


def test_unknown_key_is_one_line(home: Path) -> None:
    """An unknown key exits 3 naming the dotted key, its line and the rule."""
    config = _config(home, "pools:\n  community:\n    enable: true\n")
    result = _cli(home, "config", "show", "--config", str(config))
    assert result.code == ExitCode.CONFIG
    assert _one_line(result) == (
        f"config error: pools.community.enable (from {config}:3): "
        "unknown key (did you mean enabled?)"
    )


def test_bad_env_value_names_the_variable(home: Path) -> None:
    """A bad environment value exits 3 naming env CYBERUN_AGENT_…."""
    result = _cli(home, "config", "show", env={"CYBERUN_AGENT_LIMITS__PROGRESS_PER_S": "50"})
    assert result.code == ExitCode.CONFIG
    assert _one_line(result) == (
        "config error: limits.progress_per_s (from env CYBERUN_AGENT_LIMITS__PROGRESS_PER_S): "
        "must be less than or equal to 20"
    )


def test_bad_flag_value_names_the_flag(home: Path) -> None:
    """A bad --slots value exits 3 (not 2) naming flag --slots."""
    result = _cli(home, "config", "show", "--slots", "many")
    assert result.code == ExitCode.CONFIG
    assert _one_line(result).startswith("config error: slots (from flag --slots): must be")


def test_missing_explicit_config_file_is_an_error(home: Path) -> None:
    """--config naming a missing file exits 3 instead of falling back."""
    result = _cli(home, "config", "show", "--config", str(home / "missing.yaml"))
    assert result.code == ExitCode.CONFIG
    assert "(from flag --config)" in _one_line(result)


def test_loose_permissions_warn_on_validate(home: Path) -> None:
    """A group-readable config file holding a credential warns with chmod 600."""
    config = _config(home, f"gateway_url: https://gw.example.com\ncredential: {DK}\n", 0o640)
    result = _cli(home, "config", "validate", "--config", str(config))
    assert result.code == 0
    assert result.err.startswith(f"warning: config file with a credential {config} ")
    assert f"chmod 600 {config}" in result.err
    assert DK[3:] not in result.err


# ---------------------------------------------------------------- run


def test_run_refuses_to_start_without_what_it_needs(home: Path) -> None:
    """Run checks its configuration first: no gateway → 3, no credential → 4, bad flag → 3."""
    no_gateway = _cli(home, "run", env={"CYBERUN_AGENT_CREDENTIAL": DK})
    assert no_gateway.code == ExitCode.CONFIG
    assert "gateway_url" in _one_line(no_gateway)
    gateway = {"CYBERUN_AGENT_GATEWAY_URL": "http://127.0.0.1:9"}
    no_credential = _cli(home, "run", env=gateway)
    assert no_credential.code == ExitCode.CREDENTIAL
    assert "credential" in _one_line(no_credential)
    invalid = _cli(
        home, "run", "--log-level", "verbose", env={**gateway, "CYBERUN_AGENT_CREDENTIAL": DK}
    )
    assert invalid.code == ExitCode.CONFIG
    assert _one_line(invalid).startswith("config error: log_level (from flag --log-level)")


# ---------------------------------------------------------------- config init


def test_init_writes_0600_and_refuses_to_overwrite(home: Path) -> None:
    """Init creates the file 0600 and prints its path; a second init needs --force."""
    target = home / "etc" / "cyberun-agent.yaml"
    first = _cli(home, "config", "init", str(target))
    assert (first.code, first.out.strip()) == (0, str(target))
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.write_text("# mine\n", encoding="utf-8")
    again = _cli(home, "config", "init", str(target))
    assert again.code == ExitCode.FAILURE
    assert "--force" in again.err
    assert target.read_text(encoding="utf-8") == "# mine\n"
    forced = _cli(home, "config", "init", "--force", str(target))
    assert forced.code == 0
    assert target.read_text(encoding="utf-8").startswith("## cyberun-agent.yaml")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_initialised_template_loads_and_validates(home: Path) -> None:
    """The written template loads as is; with a gateway and credential it validates."""
    target = home / "cyberun-agent.yaml"
    assert _cli(home, "config", "init", str(target)).code == 0
    env = {"CYBERUN_AGENT_CREDENTIAL": DK}
    result = _cli(
        home,
        "config",
        "validate",
        "--config",
        str(target),
        "--gateway-url",
        "https://gw.example.com",
        env=env,
    )
    assert (result.code, result.out.strip()) == (0, f"ok: {target}")


def _uncomment(template: str) -> str:
    """Remove the "# " of every setting line, keeping "##" explanations as comments."""
    return "\n".join(line[2:] if line.startswith("# ") else line for line in template.splitlines())


def test_template_covers_every_key_with_its_default(tmp_path: Path) -> None:
    """Uncommenting the template sets every key, and each shown default equals the real one."""
    environ = {"HOME": str(tmp_path)}
    defaults = load_settings(config_path=_blank(tmp_path), environ=environ).settings
    config = tmp_path / "uncommented.yaml"
    config.write_text(_uncomment(config_template(defaults)), encoding="utf-8")
    config.chmod(0o600)
    loaded = load_settings(config_path=config, environ=environ)
    from_default = {key for key, source in loaded.sources.items() if source == "default"}
    # url (and the attached ComfyUI's directory) are shown as the alternative to launch
    assert from_default == {"runtimes.comfyui.url", "runtimes.comfyui.directory"}
    examples: dict[str, Any] = {
        "gateway_url": True,
        "credential": True,
        "credential_file": True,
        "agent_id": True,
        "runtimes": {"comfyui": True},
    }
    shown = loaded.settings.model_dump(exclude=examples)
    assert shown == defaults.model_dump(exclude=examples)


def _blank(tmp_path: Path) -> Path:
    path = tmp_path / "blank.yaml"
    path.write_text("", encoding="utf-8")
    return path


def test_template_documents_every_key(tmp_path: Path) -> None:
    """Every key name of Settings appears in the template text."""
    template = config_template(Settings())
    for key in load_settings(config_path=_blank(tmp_path), environ={"HOME": str(tmp_path)}).sources:
        assert re.search(rf"\b{re.escape(key.rsplit('.', 1)[-1])}:", template), key


# ---------------------------------------------------------------- protocol schema


def test_protocol_schema_prints_and_writes_the_rendered_schema(home: Path) -> None:
    """``protocol schema`` prints render_schema() as JSON, and --output writes the same text."""
    expected = render_schema()
    printed = _cli(home, "protocol", "schema")
    assert (printed.code, printed.err) == (ExitCode.OK, "")
    assert printed.out == expected
    assert json.loads(printed.out) == json.loads(expected)
    target = home / "schema.json"
    written = _cli(home, "protocol", "schema", "--output", str(target))
    assert (written.code, written.out, written.err) == (ExitCode.OK, "", "")
    assert target.read_text(encoding="utf-8") == expected

"""Settings: sources and precedence, provenance, every rule, credentials, the agent id."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from pydantic import BaseModel, ConfigDict, Field

from agent import config_sources
from agent.errors import ConfigError, CredentialError, ExitCode
from agent.settings import (
    SYSTEM_CONFIG_FILE,
    LoadedSettings,
    Settings,
    default_cache_dir,
    default_init_path,
    default_state_dir,
    derive_agent_ws_url,
    generate_agent_id,
    load_settings,
    resolve_agent_id,
    write_private_file,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

DK = "dk-" + "Zq8vR2mXk4T9pLw7Ny3B_Hc6"  # well-formed, 24 characters after the prefix
AK = "ak-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8"


def _load(
    tmp_path: Path,
    text: str = "",
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> LoadedSettings:
    config = tmp_path / "cyberun-agent.yaml"
    config.write_text(text, encoding="utf-8")
    config.chmod(0o600)
    environ = {"HOME": str(tmp_path), **(env or {})}
    return load_settings(config_path=config, flags=flags, environ=environ)


def _config_error(tmp_path: Path, text: str = "", **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text, **kwargs)  # type: ignore[arg-type]
    return caught.value


# ---------------------------------------------------------------- sources and precedence


def test_defaults_apply_when_nothing_is_set(tmp_path: Path) -> None:
    """An empty file yields every documented default, each reported as from default."""
    loaded = _load(tmp_path)
    s = loaded.settings
    assert s.gateway_url is None
    assert s.credential is None
    assert s.slots is None
    assert s.log_level == "info"
    assert s.log_format == "auto"
    assert s.region == ""
    assert s.agent_labels == ()
    assert s.pool_names == ["team"]
    assert s.timeouts.connect_s == 10
    assert s.timeouts.drain_grace_s == 900
    assert s.limits.max_frame_bytes == 1_048_576
    assert s.limits.progress_per_s == 4.0
    assert s.runtimes.comfyui.enabled is False
    assert s.work_dir == s.state_dir / "work"
    assert set(loaded.sources.values()) == {"default"}
    assert "timeouts.runtime_ready_s" in loaded.sources
    assert loaded.config_file == tmp_path / "cyberun-agent.yaml"


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    """Each key takes its highest-precedence source, and provenance names that source."""
    text = "slots: 1\nregion: from-file\nlog_level: debug\ntimeouts:\n  connect_s: 3\n"
    env = {"CYBERUN_AGENT_SLOTS": "2", "CYBERUN_AGENT_REGION": "from-env"}
    loaded = _load(tmp_path, text, env=env, flags={"slots": "3", "agent_id": None})
    s = loaded.settings
    config = tmp_path / "cyberun-agent.yaml"
    assert (s.slots, s.region, s.log_level, s.timeouts.connect_s) == (3, "from-env", "debug", 3)
    assert s.timeouts.ack_s == 10
    assert loaded.sources["slots"] == "flag --slots"
    assert loaded.sources["region"] == "env CYBERUN_AGENT_REGION"
    assert loaded.sources["log_level"] == f"{config}:3"
    assert loaded.sources["timeouts.connect_s"] == f"{config}:5"
    assert loaded.sources["timeouts.ack_s"] == "default"
    assert loaded.sources["agent_id"] == "default"  # a None flag is "not given"


def test_boolean_flag_provenance_names_the_negative_spelling(tmp_path: Path) -> None:
    """A false --community flag is reported as --no-community and beats the file."""
    loaded = _load(
        tmp_path,
        "pools:\n  community:\n    enabled: true\n",
        flags={"pools.community.enabled": False},
    )
    assert loaded.settings.pools.community.enabled is False
    assert loaded.sources["pools.community.enabled"] == "flag --no-community"


def test_nested_env_vars_set_nested_keys(tmp_path: Path) -> None:
    """Double underscores nest; booleans, numbers and comma or JSON lists are parsed."""
    env = {
        "CYBERUN_AGENT_POOLS__COMMUNITY__ENABLED": "true",
        "CYBERUN_AGENT_POOLS__COMMUNITY__HOURS": '["22:00-06:00", "12:00-13:00"]',
        "CYBERUN_AGENT_TIMEOUTS__CONNECT_S": "5",
        "CYBERUN_AGENT_AGENT_LABELS": " team-a, GPU-H100 ,,",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__ARGS": "--lowvram,--preview-method,auto",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__PYTHON": "/opt/comfy/bin/python",
        "CYBERUN_AGENT_RUNTIMES__COMFYUI__LAUNCH__MAIN": "/opt/comfy/main.py",
    }
    loaded = _load(tmp_path, env=env)
    s = loaded.settings
    assert s.pools.community.enabled is True
    assert s.pool_names == ["team", "community"]
    assert s.pools.community.hours == ("22:00-06:00", "12:00-13:00")
    assert s.timeouts.connect_s == 5.0
    assert s.agent_labels == ("team-a", "gpu-h100")
    assert s.runtimes.comfyui.launch is not None
    assert s.runtimes.comfyui.launch.args == ("--lowvram", "--preview-method", "auto")
    assert loaded.sources["pools.community.hours"] == "env CYBERUN_AGENT_POOLS__COMMUNITY__HOURS"


def test_json_env_object_sets_a_whole_group(tmp_path: Path) -> None:
    """A JSON object in CYBERUN_AGENT_TIMEOUTS sets its keys, each attributed to that variable."""
    loaded = _load(tmp_path, env={"CYBERUN_AGENT_TIMEOUTS": '{"ack_s": 2, "kill_grace_s": 3}'})
    assert (loaded.settings.timeouts.ack_s, loaded.settings.timeouts.kill_grace_s) == (2, 3)
    assert loaded.sources["timeouts.ack_s"] == "env CYBERUN_AGENT_TIMEOUTS"


def test_empty_env_value_unsets_an_optional_key(tmp_path: Path) -> None:
    """An empty CYBERUN_AGENT_SLOTS overrides the file's value with auto (None)."""
    loaded = _load(tmp_path, "slots: 4\n", env={"CYBERUN_AGENT_SLOTS": ""})
    assert loaded.settings.slots is None


def test_slots_auto_means_one_per_gpu(tmp_path: Path) -> None:
    """slots: auto in the file is the same as leaving slots unset."""
    assert _load(tmp_path, "slots: AUTO\n").settings.slots is None


def test_env_cannot_nest_inside_a_scalar_env_value(tmp_path: Path) -> None:
    """Setting both CYBERUN_AGENT_TIMEOUTS=3 and a key below it is a one-line error."""
    env = {"CYBERUN_AGENT_TIMEOUTS": "3", "CYBERUN_AGENT_TIMEOUTS__ACK_S": "1"}
    err = _config_error(tmp_path, env=env)
    assert err.key == "timeouts"
    assert err.source == "env CYBERUN_AGENT_TIMEOUTS__ACK_S"


# ---------------------------------------------------------------- the config file


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """Broken YAML gives one error naming FILE:LINE and never quoting the line itself."""
    err = _config_error(tmp_path, "region: eu\nagent_labels: [a,\ncredential: dk-secret\n")
    assert err.source.startswith(str(tmp_path / "cyberun-agent.yaml") + ":")
    assert err.source.rsplit(":", 1)[1] in {"3", "4"}
    assert "invalid YAML" in err.rule
    assert "dk-secret" not in str(err)
    assert err.exit_code == ExitCode.CONFIG


def test_unknown_key_in_file_names_dotted_key_line_and_suggestion(tmp_path: Path) -> None:
    """A misspelt nested key is rejected with its dotted path, line and a suggestion."""
    err = _config_error(tmp_path, "timeouts:\n  ack_s: 1\n  conect_s: 5\n")
    assert err.key == "timeouts.conect_s"
    assert err.source == f"{tmp_path / 'cyberun-agent.yaml'}:3"
    assert err.rule == "unknown key (did you mean connect_s?)"
    assert str(err) == f"config error: timeouts.conect_s (from {err.source}): {err.rule}"


def test_unknown_env_var_is_an_error(tmp_path: Path) -> None:
    """A CYBERUN_AGENT_ variable that names no key is rejected, naming the variable."""
    err = _config_error(tmp_path, env={"CYBERUN_AGENT_SLOT": "2"})
    assert (err.key, err.source) == ("slot", "env CYBERUN_AGENT_SLOT")
    assert err.rule.startswith("unknown key")


def test_kubernetes_service_links_are_not_settings(tmp_path: Path) -> None:
    """The kubelet's CYBERUN_AGENT_SERVICE_HOST/PORT_* for a Service are ignored, not errors."""
    links = {
        "CYBERUN_AGENT_SERVICE_HOST": "10.0.0.7",
        "CYBERUN_AGENT_SERVICE_PORT": "9464",
        "CYBERUN_AGENT_SERVICE_PORT_METRICS": "9464",
        "CYBERUN_AGENT_PORT": "tcp://10.0.0.7:9464",
        "CYBERUN_AGENT_PORT_9464_TCP": "tcp://10.0.0.7:9464",
        "CYBERUN_AGENT_PORT_9464_TCP_PROTO": "tcp",
        "CYBERUN_AGENT_PORT_9464_TCP_ADDR": "10.0.0.7",
    }
    loaded = _load(tmp_path, env=links)
    assert not any(key.startswith(("service", "port")) for key in loaded.sources)
    err = _config_error(tmp_path, env={"CYBERUN_AGENT_PORTS": "1"})
    assert err.source == "env CYBERUN_AGENT_PORTS"


_LOOKUP_AS_NOBODY = """
import sys
from pathlib import Path
from agent import config_sources
from agent.errors import ConfigError
target = Path(sys.argv[1])
print(config_sources.find_config_file(None, {}, home=target.parent, defaults=[target]))
try:
    config_sources.find_config_file(target, {}, home=target.parent, defaults=[])
except ConfigError as exc:
    print(exc)
"""


def test_an_unreadable_default_config_dir_is_passed_over(tmp_path: Path) -> None:
    """A default config location one may not look into is skipped; a named one is an error."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "cyberun-agent.yaml").write_text("slots: 2\n", encoding="utf-8")
    locked.chmod(0o700)  # its owner only: the lookup below runs as another user
    tmp_path.chmod(0o755)
    as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    argv = [*as_other] if os.geteuid() == 0 else []
    if not argv:
        locked.chmod(0o000)  # not root: the same user, locked out by the mode
    done = subprocess.run(
        [*argv, sys.executable, "-c", _LOOKUP_AS_NOBODY, str(locked / "cyberun-agent.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=Path(__file__).parents[2],
        env={"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    locked.chmod(0o700)
    assert done.returncode == 0, done.stderr
    default, named = done.stdout.splitlines()
    assert default == "None"
    assert "permission denied" in named


def test_bad_env_value_names_the_variable_and_rule(tmp_path: Path) -> None:
    """A zero timeout from the environment names the variable and the > 0 rule."""
    err = _config_error(tmp_path, env={"CYBERUN_AGENT_TIMEOUTS__CONNECT_S": "0"})
    assert str(err) == (
        "config error: timeouts.connect_s (from env CYBERUN_AGENT_TIMEOUTS__CONNECT_S): "
        "must be greater than 0"
    )


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_bad_flag_value_names_the_flag(tmp_path: Path, value: str) -> None:
    """An invalid --slots value is a config error naming flag --slots."""
    err = _config_error(tmp_path, flags={"slots": value})
    assert (err.key, err.source) == ("slots", "flag --slots")


def test_file_value_error_names_its_line(tmp_path: Path) -> None:
    """A rule broken in the file names the file and the line of the key."""
    err = _config_error(tmp_path, "log_level: info\nlimits:\n  max_frame_bytes: 1024\n")
    assert err.key == "limits.max_frame_bytes"
    assert err.source.endswith("cyberun-agent.yaml:3")
    assert err.rule == "must be greater than or equal to 65536"


def test_empty_groups_in_the_file_mean_defaults(tmp_path: Path) -> None:
    """A group key whose keys are all commented out (timeouts:) keeps the defaults."""
    loaded = _load(tmp_path, "timeouts:\npools:\n  community:\nruntimes:\n  comfyui:\n")
    assert loaded.settings.timeouts.connect_s == 10
    assert loaded.settings.pools.community.enabled is False
    assert loaded.settings.runtimes.comfyui.enabled is False
    err = _config_error(tmp_path, "runtimes:\n  comfyui:\n    launch:\n      python:\n")
    assert err.key == "runtimes.comfyui.launch.python"


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    """A key given twice in the file is rejected rather than silently taking the last."""
    err = _config_error(tmp_path, "slots: 1\nregion: x\nslots: 2\n")
    assert (err.key, err.rule) == ("slots", "duplicate key")
    assert err.source.endswith(":3")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    """A file whose top level is not a mapping is rejected."""
    assert _config_error(tmp_path, text).rule == "must be a mapping of keys to values"


def test_non_string_keys_are_rejected(tmp_path: Path) -> None:
    """YAML keys that are not strings (1, true) are rejected with their line."""
    err = _config_error(tmp_path, "timeouts:\n  1: 5\n")
    assert (err.key, err.rule) == ("timeouts", "keys must be strings")


def test_explicit_config_file_must_exist(tmp_path: Path) -> None:
    """--config and $CYBERUN_AGENT_CONFIG naming a missing file are errors, not fallbacks."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as by_flag:
        load_settings(config_path=missing, environ={"HOME": str(tmp_path)})
    assert by_flag.value.source == "flag --config"
    environ = {"HOME": str(tmp_path), "CYBERUN_AGENT_CONFIG": str(missing)}
    with pytest.raises(ConfigError) as by_env:
        load_settings(environ=environ)
    assert by_env.value.source == "env CYBERUN_AGENT_CONFIG"


def test_config_env_var_is_used_when_no_flag(tmp_path: Path) -> None:
    """$CYBERUN_AGENT_CONFIG is read when --config is not given; --config wins over it."""
    by_env = tmp_path / "env.yaml"
    by_env.write_text("region: env-file\n", encoding="utf-8")
    by_flag = tmp_path / "flag.yaml"
    by_flag.write_text("region: flag-file\n", encoding="utf-8")
    environ = {"HOME": str(tmp_path), "CYBERUN_AGENT_CONFIG": str(by_env)}
    assert load_settings(environ=environ).settings.region == "env-file"
    assert load_settings(config_path=by_flag, environ=environ).settings.region == "flag-file"


@pytest.mark.skipif(SYSTEM_CONFIG_FILE.exists(), reason="a system-wide config file exists here")
def test_user_config_file_is_found_under_xdg_config_home(tmp_path: Path) -> None:
    """Without --config or the variable, $XDG_CONFIG_HOME/cyberun-agent/ is looked up."""
    user = tmp_path / "xdg" / "cyberun-agent" / "cyberun-agent.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("region: user\n", encoding="utf-8")
    environ = {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    loaded = load_settings(environ=environ)
    assert (loaded.config_file, loaded.settings.region) == (user, "user")
    assert load_settings(environ={"HOME": str(tmp_path / "empty")}).config_file is None


# ---------------------------------------------------------------- credentials


def test_malformed_credential_is_a_credential_error_without_the_value(tmp_path: Path) -> None:
    """A malformed credential exits 4, names credential and its source, never the value."""
    bad = "dk-THIS-IS-a-typo'd-secret!"
    with pytest.raises(CredentialError) as caught:
        _load(tmp_path, env={"CYBERUN_AGENT_CREDENTIAL": bad})
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.CREDENTIAL
    assert int(caught.value.exit_code) == 4
    assert message.startswith("config error: credential (from env CYBERUN_AGENT_CREDENTIAL): ")
    assert bad not in message
    assert "THIS-IS" not in message


def test_malformed_credential_file_content_is_not_echoed(tmp_path: Path) -> None:
    """A credential file with a malformed value fails on use, naming the file only."""
    secret = tmp_path / "credential"
    secret.write_text("xk-not-a-real-key-but-secret-anyway\n", encoding="utf-8")
    loaded = _load(tmp_path, flags={"credential_file": str(secret)})
    with pytest.raises(CredentialError) as caught:
        loaded.settings.credential_value()
    assert str(secret) in str(caught.value)
    assert "not-a-real-key" not in str(caught.value)


def test_credential_precedence_inline_then_file_then_systemd(tmp_path: Path) -> None:
    """The inline credential beats credential_file, which beats $CREDENTIALS_DIRECTORY."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cyberun-agent-credential").write_text(AK, encoding="utf-8")
    secret = tmp_path / "credential"
    secret.write_text(f"  {DK}\n", encoding="utf-8")
    secret.chmod(0o600)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    systemd = _load(tmp_path, env=env).settings
    assert systemd.credential_value() == AK
    assert systemd.credential_origin() == f"systemd credential {creds}/cyberun-agent-credential"
    from_file = _load(tmp_path, env=env, flags={"credential_file": str(secret)}).settings
    assert from_file.credential_value() == DK
    inline = _load(tmp_path, f"credential: {AK}\n", env={**env, "CYBERUN_AGENT_CREDENTIAL": DK})
    assert inline.settings.credential_value() == DK
    assert inline.sources["credential"] == "env CYBERUN_AGENT_CREDENTIAL"
    assert _load(tmp_path).settings.credential_value() is None


def test_login_pair_file_gives_the_agent_key_to_the_connection(tmp_path: Path) -> None:
    """A file with the dk-/ak- pair `login` writes yields the ak-; comments are ignored."""
    secret = tmp_path / "credential"
    secret.write_text(f"# written by login\n{DK}\n\n{AK}\n", encoding="utf-8")
    secret.chmod(0o600)
    assert _load(tmp_path, flags={"credential_file": str(secret)}).settings.credential_value() == AK
    secret.write_text(f"{DK}\nnot-a-key-at-all-but-long-enough\n", encoding="utf-8")
    with pytest.raises(CredentialError) as caught:
        _load(tmp_path, flags={"credential_file": str(secret)}).settings.credential_value()
    assert "not-a-key" not in str(caught.value)
    secret.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(CredentialError, match="empty"):
        _load(tmp_path, flags={"credential_file": str(secret)}).settings.credential_value()


def test_login_credential_in_state_dir_is_the_last_resort(tmp_path: Path) -> None:
    """<state_dir>/credential is used only when no other credential source is configured."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "credential").write_text(f"{DK}\n{AK}\n", encoding="utf-8")
    (state / "credential").chmod(0o600)
    flags = {"state_dir": str(state)}
    stored = _load(tmp_path, flags=flags).settings
    assert stored.credential_value() == AK
    assert stored.credential_origin() == f"login credential {state / 'credential'}"
    assert stored.login_credential_file == state / "credential"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "cyberun-agent-credential").write_text(DK, encoding="utf-8")
    systemd = _load(tmp_path, env={"CREDENTIALS_DIRECTORY": str(creds)}, flags=flags).settings
    assert systemd.credential_value() == DK
    other = tmp_path / "elsewhere"
    named = _load(tmp_path, flags={**flags, "credential_file": str(other)}).settings
    assert named.login_credential_file == other


def test_credential_is_never_in_repr_or_dump(tmp_path: Path) -> None:
    """The credential is a secret: neither repr nor a JSON dump of the settings shows it."""
    settings = _load(tmp_path, env={"CYBERUN_AGENT_CREDENTIAL": DK}).settings
    assert DK not in repr(settings)
    assert DK not in settings.model_dump_json()


def test_check_runnable_requires_gateway_and_credential(tmp_path: Path) -> None:
    """Running needs a gateway URL (ConfigError) and a credential (CredentialError)."""
    with pytest.raises(ConfigError, match="gateway_url"):
        _load(tmp_path).check_runnable()
    without_credential = _load(tmp_path, "gateway_url: https://gw.example.com\n")
    with pytest.raises(CredentialError, match="is required"):
        without_credential.check_runnable()
    env = {"CYBERUN_AGENT_CREDENTIAL": AK}
    _load(tmp_path, "gateway_url: https://gw.example.com\n", env=env).check_runnable()


def test_loose_credential_file_permissions_warn(tmp_path: Path) -> None:
    """A group/other-readable credential file yields a warning naming it and chmod 600."""
    secret = tmp_path / "credential"
    secret.write_text(DK, encoding="utf-8")
    secret.chmod(0o644)
    warnings = _load(tmp_path, flags={"credential_file": str(secret)}).warnings
    assert len(warnings) == 1
    assert str(secret) in warnings[0]
    assert "chmod 600" in warnings[0]
    assert DK not in warnings[0]
    secret.chmod(0o600)
    assert _load(tmp_path, flags={"credential_file": str(secret)}).warnings == ()


def test_loose_config_file_warns_only_when_it_holds_a_credential(tmp_path: Path) -> None:
    """A world-readable config file warns if it contains credential:, not otherwise."""
    config = tmp_path / "cyberun-agent.yaml"
    environ = {"HOME": str(tmp_path)}
    config.write_text(f"credential: {DK}\n", encoding="utf-8")
    config.chmod(0o644)
    warnings = load_settings(config_path=config, environ=environ).warnings
    assert len(warnings) == 1
    assert str(config) in warnings[0]
    config.write_text("region: x\n", encoding="utf-8")
    assert load_settings(config_path=config, environ=environ).warnings == ()


# ---------------------------------------------------------------- agent id


def test_agent_id_is_generated_once_and_stable(tmp_path: Path) -> None:
    """Without agent_id, one id is generated, stored 0600 under state_dir and reused."""
    flags = {"state_dir": str(tmp_path / "state")}
    first = resolve_agent_id(_load(tmp_path, flags=flags).settings)
    second = resolve_agent_id(_load(tmp_path, flags=flags).settings)
    stored = tmp_path / "state" / "agent_id"
    assert first == second
    assert stored.read_text(encoding="utf-8").strip() == first
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert len(first.rsplit("-", 1)[1]) == 8


def test_configured_agent_id_wins_and_writes_nothing(tmp_path: Path) -> None:
    """An explicit agent_id is returned as is and no id file is created."""
    flags = {"state_dir": str(tmp_path / "state"), "agent_id": "gpu-node-01"}
    assert resolve_agent_id(_load(tmp_path, flags=flags).settings) == "gpu-node-01"
    assert not (tmp_path / "state").exists()


def test_invalid_stored_agent_id_is_a_config_error(tmp_path: Path) -> None:
    """A corrupted state_dir/agent_id file is reported, not silently replaced."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agent_id").write_text("not valid!\n", encoding="utf-8")
    settings = _load(tmp_path, flags={"state_dir": str(tmp_path / "state")}).settings
    with pytest.raises(ConfigError, match="stored agent id is invalid"):
        resolve_agent_id(settings)


@pytest.mark.parametrize(
    ("hostname", "prefix"),
    [
        ("GPU Node_01.example.com", "gpu-node_01-"),
        ("--x", "x-"),
        ("", "agent-"),
        ("a" * 80, "a" * 55 + "-"),
    ],
)
def test_generated_agent_id_is_a_sanitised_hostname(hostname: str, prefix: str) -> None:
    """Generated ids are the sanitised short hostname plus 8 hex digits, and always valid."""
    agent_id = generate_agent_id(hostname)
    assert agent_id.startswith(prefix)
    assert len(agent_id) == len(prefix) + 8
    assert Settings(agent_id=agent_id).agent_id == agent_id


@pytest.mark.parametrize("value", ["-leading-dash", "has space", "x" * 65, "ünïcode"])
def test_invalid_agent_id_is_rejected(tmp_path: Path, value: str) -> None:
    """agent_id must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$."""
    assert _config_error(tmp_path, flags={"agent_id": value}).key == "agent_id"


# ---------------------------------------------------------------- gateway URL


@pytest.mark.parametrize(
    ("gateway_url", "endpoint"),
    [
        ("https://gw.example.com", "wss://gw.example.com/agent/v1/ws"),
        ("https://gw.example.com:8443/base/", "wss://gw.example.com:8443/base/agent/v1/ws"),
        ("wss://gw.example.com/x", "wss://gw.example.com/x/agent/v1/ws"),
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/agent/v1/ws"),
        ("ws://localhost/agent/v1/ws", "ws://localhost/agent/v1/ws"),
        ("HTTPS://GW.example.com", "wss://GW.example.com/agent/v1/ws"),
    ],
)
def test_agent_ws_url_is_derived_from_the_gateway_url(
    tmp_path: Path, gateway_url: str, endpoint: str
) -> None:
    """Scheme http maps to ws, https to wss; the base path stays, the endpoint is added once."""
    settings = _load(tmp_path, flags={"gateway_url": gateway_url}).settings
    assert settings.agent_ws_url == endpoint
    assert derive_agent_ws_url(settings.gateway_url or "") == endpoint


@pytest.mark.parametrize(
    "gateway_url",
    ["http://127.0.0.1", "http://127.3.4.5:9", "ws://[::1]:8080", "http://LOCALHOST:80"],
)
def test_plain_gateway_is_allowed_on_loopback(tmp_path: Path, gateway_url: str) -> None:
    """Plain http/ws is accepted for 127.0.0.0/8, ::1 and localhost."""
    assert _load(tmp_path, flags={"gateway_url": gateway_url}).settings.gateway_url is not None


@pytest.mark.parametrize("gateway_url", ["http://10.0.0.1", "ws://gw.example.com", "http://[::2]"])
def test_plain_gateway_elsewhere_needs_allow_insecure(tmp_path: Path, gateway_url: str) -> None:
    """Plain http/ws to a non-loopback host fails unless allow_insecure_gateway is true."""
    err = _config_error(tmp_path, flags={"gateway_url": gateway_url})
    assert err.key == "gateway_url"
    assert "loopback" in err.rule
    allowed = _load(tmp_path, "allow_insecure_gateway: true\n", flags={"gateway_url": gateway_url})
    assert allowed.settings.agent_ws_url.startswith("ws://")


@pytest.mark.parametrize(
    ("gateway_url", "rule"),
    [
        ("ftp://gw.example.com", "must start with"),
        ("https://", "host"),
        ("https://user:pw@gw.example.com", "user name or password"),
        ("https://gw.example.com/?token=x", "query"),
        ("https://gw.example.com:99999", "port"),
    ],
)
def test_malformed_gateway_urls_are_rejected(tmp_path: Path, gateway_url: str, rule: str) -> None:
    """Unsupported schemes, missing hosts, user info, queries and bad ports are errors."""
    err = _config_error(tmp_path, flags={"gateway_url": gateway_url})
    assert rule in err.rule
    assert "pw" not in str(err)


def test_agent_ws_url_without_gateway_is_a_config_error(tmp_path: Path) -> None:
    """Asking for the endpoint with no gateway_url raises ConfigError, not AttributeError."""
    with pytest.raises(ConfigError, match="gateway_url"):
        _ = _load(tmp_path).settings.agent_ws_url


# ---------------------------------------------------------------- pools and runtimes


@pytest.mark.parametrize(
    "text", ["pools:\n  team: false\n", "pools:\n  team:\n    enabled: false\n"]
)
def test_team_pool_cannot_be_disabled(tmp_path: Path, text: str) -> None:
    """pools.team: false (either spelling) is rejected with a clear rule."""
    err = _config_error(tmp_path, text)
    assert err.key.startswith("pools.team")
    assert err.rule == "the team pool cannot be disabled"


def test_community_hours_are_normalised(tmp_path: Path) -> None:
    """Hour windows are normalised to HH:MM-HH:MM and 24:00 is accepted as an end."""
    text = 'pools:\n  community:\n    hours: ["8:00-9:00x"]\n'
    assert _config_error(tmp_path, text).key == "pools.community.hours[0]"
    text = 'pools:\n  community:\n    hours: ["22:00 - 24:00", "00:00-06:30"]\n'
    hours = _load(tmp_path, text).settings.pools.community.hours
    assert hours == ("22:00-24:00", "00:00-06:30")


@pytest.mark.parametrize(
    ("window", "rule"),
    [
        ("25:00-06:00", "outside"),
        ("10:60-11:00", "outside"),
        ("24:00-06:00", "outside"),
        ("08:00-08:00", "must differ"),
        ("00:00-24:00", "must differ"),
        ("8-17", "HH:MM-HH:MM"),
    ],
)
def test_bad_community_hours_are_rejected(tmp_path: Path, window: str, rule: str) -> None:
    """Malformed or empty windows name the list item and the line."""
    text = f'pools:\n  community:\n    hours:\n      - "09:00-10:00"\n      - "{window}"\n'
    err = _config_error(tmp_path, text)
    assert err.key == "pools.community.hours[1]"
    assert err.source.endswith(":5")
    assert rule in err.rule


def test_community_timezone_must_exist(tmp_path: Path) -> None:
    """An unknown time zone is rejected; a real one is accepted."""
    err = _config_error(tmp_path, "pools:\n  community:\n    timezone: Mars/Olympus\n")
    assert err.key == "pools.community.timezone"
    ok = _load(tmp_path, "pools:\n  community:\n    timezone: Europe/Berlin\n")
    assert ok.settings.pools.community.timezone == "Europe/Berlin"


def test_community_hours_wrap_midnight_in_their_timezone(tmp_path: Path) -> None:
    """A 22:00-06:00 window in Asia/Tokyo is open at 23:30 and 05:59 Tokyo time only."""
    text = "pools:\n  community:\n    hours: ['22:00-06:00']\n    timezone: Asia/Tokyo\n"
    community = _load(tmp_path, text).settings.pools.community
    assert community.is_open(datetime(2026, 1, 1, 14, 30, tzinfo=UTC))  # 23:30 in Tokyo
    assert community.is_open(datetime(2026, 1, 1, 20, 59, tzinfo=UTC))  # 05:59
    assert not community.is_open(datetime(2026, 1, 1, 21, 0, tzinfo=UTC))  # 06:00
    assert not community.is_open(datetime(2026, 1, 1, 3, 0, tzinfo=UTC))  # 12:00
    assert _load(tmp_path).settings.pools.community.is_open(datetime(2026, 1, 1, tzinfo=UTC))


def test_comfyui_url_and_launch_are_exclusive(tmp_path: Path) -> None:
    """Setting both url and launch is an error; neither disables ComfyUI."""
    text = (
        "runtimes:\n  comfyui:\n    url: http://127.0.0.1:8188\n"
        "    launch:\n      python: /usr/bin/python3\n      main: /opt/c/main.py\n"
    )
    err = _config_error(tmp_path, text)
    assert (err.key, err.rule) == ("runtimes.comfyui", "set either url or launch, not both")
    assert err.source.endswith(":2")
    attach = _load(tmp_path, "runtimes:\n  comfyui:\n    url: https://comfy.local:8188/\n")
    assert attach.settings.runtimes.comfyui.url == "https://comfy.local:8188"
    assert attach.settings.runtimes.comfyui.enabled


def test_comfyui_launch_requires_python_and_main(tmp_path: Path) -> None:
    """A launch block without main names runtimes.comfyui.launch.main as required."""
    err = _config_error(tmp_path, "runtimes:\n  comfyui:\n    launch:\n      python: /bin/py\n")
    assert (err.key, err.rule) == ("runtimes.comfyui.launch.main", "is required")


def test_comfyui_url_must_be_http(tmp_path: Path) -> None:
    """runtimes.comfyui.url must be an http(s) URL."""
    err = _config_error(tmp_path, env={"CYBERUN_AGENT_RUNTIMES__COMFYUI__URL": "ws://x"})
    assert err.key == "runtimes.comfyui.url"


# ---------------------------------------------------------------- labels, region, paths, misc


def test_labels_are_normalised_and_deduplicated(tmp_path: Path) -> None:
    """Labels are trimmed, lower-cased and deduplicated with their first order kept."""
    text = "agent_labels: [' Team-A', gpu-h100, team-a, x.y_z]\n"
    assert _load(tmp_path, text).settings.agent_labels == ("team-a", "gpu-h100", "x.y_z")


def test_bad_label_names_its_index_and_line(tmp_path: Path) -> None:
    """An invalid label is reported as agent_labels[i] with the item's line."""
    err = _config_error(tmp_path, "agent_labels:\n  - ok\n  - not ok!\n")
    assert err.key == "agent_labels[1]"
    assert err.source.endswith(":3")


def test_region_is_normalised_and_bounded(tmp_path: Path) -> None:
    """Region is trimmed and lower-cased; more than 64 characters is an error."""
    assert _load(tmp_path, flags={"region": "  EU-West-1 "}).settings.region == "eu-west-1"
    assert _load(tmp_path, flags={"region": " " + "a" * 64 + " "}).settings.region == "a" * 64
    assert _config_error(tmp_path, flags={"region": "a" * 65}).key == "region"


def test_paths_are_expanded_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """~ expands with the given HOME, relative paths become absolute, work_dir follows state."""
    monkeypatch.chdir(tmp_path)
    loaded = _load(tmp_path, "state_dir: ~/state\ncache_dir: rel/cache\n")
    s = loaded.settings
    assert s.state_dir == tmp_path / "state"
    assert s.work_dir == tmp_path / "state" / "work"
    assert s.cache_dir == tmp_path / "rel" / "cache"
    assert loaded.sources["work_dir"] == "default"
    assert _load(tmp_path, flags={"work_dir": "~/w"}).settings.work_dir == tmp_path / "w"


def test_default_directories_depend_on_root_and_xdg(tmp_path: Path) -> None:
    """Root uses /var/lib and /var/cache; users use XDG locations under HOME."""
    env = {"HOME": str(tmp_path)}
    assert default_state_dir(env, root=True) == Path("/var/lib/cyberun-agent")
    assert default_cache_dir(env, root=True) == Path("/var/cache/cyberun-agent")
    assert default_state_dir(env, root=False) == tmp_path / ".local/state/cyberun-agent"
    assert default_cache_dir(env, root=False) == tmp_path / ".cache/cyberun-agent"
    xdg = {**env, "XDG_STATE_HOME": str(tmp_path / "s"), "XDG_CACHE_HOME": "relative"}
    assert default_state_dir(xdg, root=False) == tmp_path / "s/cyberun-agent"
    assert default_cache_dir(xdg, root=False) == tmp_path / ".cache/cyberun-agent"
    assert default_init_path(env, root=True) == SYSTEM_CONFIG_FILE
    assert (
        default_init_path(env, root=False) == tmp_path / ".config/cyberun-agent/cyberun-agent.yaml"
    )


def test_log_level_is_case_insensitive_and_checked(tmp_path: Path) -> None:
    """LOG_LEVEL=WARNING is accepted; an unknown log_format is rejected."""
    assert (
        _load(tmp_path, env={"CYBERUN_AGENT_LOG_LEVEL": "WARNING"}).settings.log_level == "warning"
    )
    err = _config_error(tmp_path, flags={"log_format": "xml"})
    assert (err.key, err.source) == ("log_format", "flag --log-format")
    assert err.rule.startswith("must be 'auto', 'json' or 'console'")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("timeouts:\n  heartbeat_s: -1\n", "timeouts.heartbeat_s"),
        ("limits:\n  progress_per_s: 21\n", "limits.progress_per_s"),
        ("limits:\n  progress_per_s: 0\n", "limits.progress_per_s"),
        ("pools:\n  community:\n    max_concurrent: 0\n", "pools.community.max_concurrent"),
        ("runtimes:\n  nerfstudio: yes\n", "runtimes.nerfstudio"),
    ],
)
def test_numeric_bounds_and_group_shapes_are_enforced(tmp_path: Path, text: str, key: str) -> None:
    """Timeouts > 0, progress rate in (0, 20], pool limits >= 1, groups are mappings."""
    assert _config_error(tmp_path, text).key == key


def test_settings_models_are_frozen() -> None:
    """Settings cannot be changed after validation."""
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.region = "x"


def test_write_private_file_is_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """Files are created 0600 (parents made); overwriting needs overwrite=True and stays 0600."""
    path = tmp_path / "a" / "b" / "file"
    write_private_file(path, "one")
    with pytest.raises(FileExistsError):
        write_private_file(path, "two")
    path.chmod(0o644)
    write_private_file(path, "three", overwrite=True)
    assert path.read_text(encoding="utf-8") == "three"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["file"]


# ---------------------------------------------------------------- the layer machinery


class _Inner(BaseModel):
    """A nested group of the stand-in model."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=1, ge=1)


class _Probe(BaseModel):
    """A stand-in for Settings: the layer machinery takes the model as a parameter."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    tags: tuple[str, ...] = ()
    inner: _Inner = Field(default_factory=_Inner)


def _probe_layers(tmp_path: Path, text: str, environ: Mapping[str, str]) -> config_sources.Layers:
    path = tmp_path / "probe.yaml"
    path.write_text(text, encoding="utf-8")
    layers = config_sources.Layers()
    layers.merge(*config_sources.read_config_file(path, _Probe))
    layers.merge(*config_sources.env_layer(environ, _Probe))
    return layers


def test_config_sources_layer_and_translate_for_any_model(tmp_path: Path) -> None:
    """Files, env and errors work for a model passed in, with the same provenance and rules."""
    env = {"CYBERUN_AGENT_TAGS": "a, b", "CYBERUN_AGENT_INNER__LIMIT": "3", "OTHER": "x"}
    layers = _probe_layers(tmp_path, "name: probe\ninner:\n", env)
    probe = config_sources.validate(_Probe, layers, {})
    assert (probe.name, probe.tags, probe.inner.limit) == ("probe", ("a", "b"), 3)
    sources = config_sources.leaf_sources(probe, layers.sources)
    assert sources == {
        "name": f"{tmp_path / 'probe.yaml'}:1",
        "tags": "env CYBERUN_AGENT_TAGS",
        "inner.limit": "env CYBERUN_AGENT_INNER__LIMIT",
    }
    bad = _probe_layers(tmp_path, "inner:\n  limitt: 2\n", {})
    with pytest.raises(ConfigError) as caught:
        config_sources.validate(_Probe, bad, {})
    assert (caught.value.key, caught.value.source) == (
        "inner.limitt",
        f"{tmp_path / 'probe.yaml'}:2",
    )
    assert caught.value.rule == "unknown key (did you mean limit?)"


def test_config_sources_imports_without_settings() -> None:
    """agent.config_sources stands below agent.settings: importing it loads no settings module."""
    code = "import sys, agent.config_sources; sys.exit('agent.settings' in sys.modules)"
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, check=False, timeout=30)
    assert done.returncode == 0

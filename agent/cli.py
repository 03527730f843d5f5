"""The ``cyberun-agent`` command line: argv → settings → logging → the daemon, and exit codes.

Commands: ``run``, ``doctor``, ``login``, ``hardware``, ``config show|validate|init``,
``protocol schema``. Every `AgentError`
ends the process with one redacted line on stderr and the error's `ExitCode`; argparse's
own usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent import PROG, __version__, logs
from agent.config_template import config_template as config_template  # noqa: PLC0414 re-export
from agent.errors import AgentError, ConfigError, ExitCode
from agent.settings import (
    CONFIG_ENV,
    CREDENTIAL_NAME,
    FLAG_NAMES,
    LoadedSettings,
    default_init_path,
    load_settings,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    Handler = Callable[[argparse.Namespace], int]


RUN_EPILOG = """
signals:
  SIGTERM/SIGINT  1st: drain — take no new work, let running tasks finish (timeouts.drain_grace_s),
                  then cancel what is left, report everything, exit 0
                  2nd: cancel running tasks now, report them cancelled, exit 0
                  3rd: exit at once (exit 1); the journal reports the rest after a restart
"""

EPILOG = f"""\
configuration precedence: flags > CYBERUN_AGENT_* environment > config file > defaults.
config file lookup: --config, ${CONFIG_ENV}, /etc/cyberun-agent/cyberun-agent.yaml,
~/.config/cyberun-agent/cyberun-agent.yaml (the first that exists).

exit codes:
  0  ok (stopped on request)
  1  unexpected failure; a supervisor should restart the agent
  2  bad command line
  3  configuration invalid; fix it, restarting will not help
  4  credential missing, malformed or refused; do not restart
  5  the gateway requires a protocol version this agent lacks
"""

_CREDENTIAL_FILE_HELP = (
    "file holding the credential (dk-… or ak-…). There is deliberately no --credential "
    "flag: command lines are visible to every local user (ps, /proc); use this, "
    f"$CYBERUN_AGENT_CREDENTIAL or the systemd credential {CREDENTIAL_NAME}"
)

_FLAG_HELP: dict[str, tuple[str, str]] = {
    # key: (metavar, help)
    "gateway_url": ("URL", "gateway base URL (https://… or wss://…; http/ws only to loopback)"),
    "credential_file": ("PATH", _CREDENTIAL_FILE_HELP),
    "agent_id": ("ID", "this agent's id (default: generated once, kept in state_dir/agent_id)"),
    "region": ("REGION", "region hint for dispatch (lower-cased, at most 64 characters)"),
    "agent_labels": ("LABEL", "extra agent label; repeat for several (replaces agent_labels)"),
    "slots": ("N", "concurrent task slots, or 'auto' for one per GPU"),
    "state_dir": ("DIR", "directory for the agent's state (agent id, task journal)"),
    "work_dir": ("DIR", "directory for task working directories (default: state_dir/work)"),
    "cache_dir": ("DIR", "directory for the model and download cache"),
    "log_level": ("LEVEL", "debug, info, warning or error"),
    "log_format": ("FORMAT", "auto (console on a terminal, else JSON), json or console"),
}


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are redacted (they echo what was typed)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {logs.redact(message)}\n")


def _common_parser() -> _Parser:
    """Build the flags shared by ``run``, ``config show`` and ``config validate``."""
    parent = _Parser(add_help=False, allow_abbrev=False)
    group = parent.add_argument_group("configuration (overrides the environment and the file)")
    group.add_argument(
        "--config",
        metavar="PATH",
        type=Path,
        default=None,
        help=f"config file to read (it must exist); else ${CONFIG_ENV} or the default lookup",
    )
    for key, (metavar, text) in _FLAG_HELP.items():
        group.add_argument(
            FLAG_NAMES[key],
            dest=key,
            metavar=metavar,
            default=argparse.SUPPRESS,
            action="append" if key == "agent_labels" else "store",
            help=text,
        )
    group.add_argument(
        FLAG_NAMES["pools.community.enabled"],
        dest="pools.community.enabled",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="serve (or do not serve) the community pool, besides the team pool",
    )
    return parent


def _add_setup_commands(
    commands: argparse._SubParsersAction[_Parser],
    common: _Parser,
) -> None:
    doctor = commands.add_parser(
        "doctor",
        allow_abbrev=False,
        parents=[common],
        help="check this machine: config, credential, gateway, clock, GPUs, runtimes, disk",
        description="Check everything the agent needs and say how to fix what is wrong; "
        "exits 1 when any check fails.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of a table")
    doctor.set_defaults(handler=_doctor)
    login = commands.add_parser(
        "login",
        allow_abbrev=False,
        parents=[common],
        help="pair this machine with a team (device flow) and store its keys",
        description="Pair this machine: show a code to approve, wait for the approval, and "
        "store the device credential and agent key (mode 0600) in credential_file, "
        "else <state_dir>/credential.",
    )
    login.set_defaults(handler=_login)
    hardware = commands.add_parser(
        "hardware",
        allow_abbrev=False,
        parents=[common],
        help="print what this machine advertises: capability, GPUs, health, labels",
        description="Probe the machine (NVML, CPU, memory, disk) as the daemon does.",
    )
    hardware.add_argument("--json", action="store_true", help="print JSON")
    hardware.set_defaults(handler=_hardware)
    status = commands.add_parser(
        "status",
        allow_abbrev=False,
        parents=[common],
        help="show the running agent's state (from its observe endpoint)",
        description="Ask the running agent (observe.listen) for its connection, slots, tasks "
        "and GPUs; exits 1 when no agent answers.",
    )
    status.add_argument("--json", action="store_true", help="print the JSON it answers")
    status.set_defaults(handler=_status)
    models = commands.add_parser(
        "models", allow_abbrev=False, help="the local model cache", description="Model cache."
    )
    models_sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    listing = models_sub.add_parser(
        "list",
        allow_abbrev=False,
        parents=[common],
        help="cached models: hash, size, last use, where each is placed",
        description="List the models in <cache_dir>/models.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_models_list)
    sync = models_sub.add_parser(
        "sync",
        allow_abbrev=False,
        parents=[common],
        help="pull the team's models now (progress bar; --json for machines)",
        description="Ask the gateway for the team's model set (a capacity-less session, like "
        "doctor) and fetch, verify and place every model, as the daemon does at connect.",
    )
    sync.add_argument("--json", action="store_true", help="print a JSON report")
    sync.set_defaults(handler=_models_sync)
    prune = models_sub.add_parser(
        "prune",
        allow_abbrev=False,
        parents=[common],
        help="evict least recently used models down to a size (and their placed links)",
        description="Evict cached models, least recently used first, until the cache holds at "
        "most --budget bytes (default models.budget_bytes). Stop the agent first: it keeps "
        "the team's set and the models running tasks use; this command does not know them.",
    )
    prune.add_argument("--budget", type=int, help="bytes to keep (default models.budget_bytes)")
    prune.set_defaults(handler=_models_prune)


def _add_config_commands(
    commands: argparse._SubParsersAction[_Parser],
    common: _Parser,
) -> None:
    config = commands.add_parser(
        "config",
        allow_abbrev=False,
        help="show, check or create the configuration",
        description="Configuration.",
    )
    sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = sub.add_parser(
        "show",
        allow_abbrev=False,
        parents=[common],
        help="print the effective settings and where each came from (secrets hidden)",
        description="Print the effective settings and the source of each value.",
    )
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(handler=_config_show)
    validate = sub.add_parser(
        "validate",
        allow_abbrev=False,
        parents=[common],
        help="check that the configuration is valid and complete enough to run",
        description="Check the configuration, including the gateway URL and the credential.",
    )
    validate.set_defaults(handler=_config_validate)
    init = sub.add_parser(
        "init",
        allow_abbrev=False,
        help="write a commented config file with every key (mode 0600)",
        description="Write a commented configuration template with every key.",
    )
    init.add_argument(
        "path",
        nargs="?",
        type=Path,
        metavar="PATH",
        help="where to write it (default: ~/.config/cyberun-agent/cyberun-agent.yaml, "
        "or /etc/cyberun-agent/cyberun-agent.yaml as root)",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_config_init)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``cyberun-agent`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Cyberun bring-your-own-GPU worker agent.",
        allow_abbrev=False,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _common_parser()
    run = commands.add_parser(
        "run",
        allow_abbrev=False,
        parents=[common],
        help="run the agent daemon",
        description="Connect to the gateway and run dispatched tasks until stopped.",
        epilog=EPILOG + RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.set_defaults(handler=_run)
    _add_setup_commands(commands, common)
    _add_config_commands(commands, common)
    protocol = commands.add_parser(
        "protocol", help="protocol tools", description="Protocol.", allow_abbrev=False
    )
    protocol_sub = protocol.add_subparsers(dest="protocol_command", metavar="SUBCOMMAND")
    protocol_sub.required = True
    schema = protocol_sub.add_parser(
        "schema",
        allow_abbrev=False,
        help="print the JSON Schema of protocol v1",
        description="Print the JSON Schema of every protocol v1 message.",
    )
    schema.add_argument("--output", metavar="FILE", type=Path, help="write it to FILE instead")
    schema.set_defaults(handler=_protocol_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    handler: Handler = args.handler
    try:
        return int(handler(args))
    except AgentError as err:
        print(_one_line(str(err)), file=sys.stderr)
        return int(err.exit_code)
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.FAILURE


def _one_line(text: str) -> str:
    return " ".join(logs.redact(text).split())


# ---------------------------------------------------------------- handlers


def _load(args: argparse.Namespace) -> LoadedSettings:
    flags = {key: value for key, value in vars(args).items() if key in FLAG_NAMES}
    return load_settings(config_path=args.config, flags=flags)


def _print_warnings(loaded: LoadedSettings) -> None:
    for warning in loaded.warnings:
        print(f"warning: {_one_line(warning)}", file=sys.stderr)


def _config_show(args: argparse.Namespace) -> int:
    loaded = _load(args)
    _print_warnings(loaded)
    return int(_config_cli().show(loaded, as_json=args.json))


def _config_validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    _print_warnings(loaded)
    loaded.check_runnable()
    print(f"ok: {loaded.config_file or 'no config file'}")
    return ExitCode.OK


def _config_init(args: argparse.Namespace) -> int:
    path: Path = args.path.absolute() if args.path is not None else default_init_path()
    return int(_config_cli().init(path, force=args.force))


def _config_cli() -> Any:
    return importlib.import_module("agent.config_cli")


def _protocol_schema(args: argparse.Namespace) -> int:
    schema = importlib.import_module("agent.protocol.schema")
    text = str(schema.render_schema())
    text = text if text.endswith("\n") else text + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return ExitCode.OK


def _doctor(args: argparse.Namespace) -> int:
    logs.configure("error", "console")  # the checks print the report; keep library chatter out
    doctor = importlib.import_module("agent.doctor")
    checks = doctor.diagnose(lambda: _load(args))
    if args.json:
        print(logs.redact(json.dumps(doctor.as_json(checks), indent=2)))
    else:
        print(logs.redact(doctor.as_table(checks)))
    return ExitCode.FAILURE if doctor.failed(checks) else ExitCode.OK


def _login(args: argparse.Namespace) -> int:
    loaded = _load(args)
    settings = loaded.settings
    if settings.gateway_url is None:
        raise ConfigError(
            "gateway_url",
            loaded.source_of("gateway_url"),
            f"is required to log in (--gateway-url, {CONFIG_ENV} file or "
            "CYBERUN_AGENT_GATEWAY_URL)",
        )
    logs.configure("error", "console")
    login = importlib.import_module("agent.login")
    path = settings.login_credential_file
    login.login(settings.gateway_url, path, show=lambda text: print(text, flush=True))
    print(f"paired: the device credential (dk-…) and agent key (ak-…) are in {path} (mode 0600)")
    origin = settings.credential_origin()
    if origin is not None and str(path) not in origin:
        print(f"note: the agent still uses the credential from {origin}, which comes first")
    return ExitCode.OK


def _hardware(args: argparse.Namespace) -> int:
    settings = _load(args).settings
    logs.configure("error", "console")
    hardware = importlib.import_module("agent.hardware")
    health = importlib.import_module("agent.health")
    monitor = health.GpuMonitor(health.GpuPolicy.of(settings.gpu))
    try:
        state = monitor.start()
    finally:
        monitor.close()
    gpus = state.gpu_infos()
    report = {
        "capability": hardware.capability(settings.work_dir, settings.cache_dir, gpus).model_dump(
            mode="json"
        ),
        "labels": list(dict.fromkeys((*hardware.gpu_labels(gpus), *settings.agent_labels))),
        "region": settings.region,
        "gpus": [s.model_dump(mode="json", exclude_none=True) for s in state.snapshots()],
        "nvml": state.nvml or "ok",
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return ExitCode.OK
    capability = report["capability"]
    print(
        f"platform: {capability['platform_arch']}, {capability['cpu']['count']} CPUs "
        f"({capability['cpu']['model']}), {capability['ram_bytes'] / 2**30:.1f} GiB RAM"
    )
    print(f"nvml: {report['nvml']}")
    for found, snapshot in zip(state.inventory.gpus, state.snapshots(), strict=True):
        verdict = f"NOT OFFERED: {snapshot.problem}" if snapshot.problem else "ok"
        print(f"gpu {found.index}: {found.name}, {found.vram_total / 2**30:.0f} GiB — {verdict}")
    print(f"labels: {', '.join(report['labels']) or '(none)'} (+ one per healthy runtime)")
    return ExitCode.OK


def _status(args: argparse.Namespace) -> int:
    status_cli = importlib.import_module("agent.status_cli")
    return int(status_cli.show(_load(args), as_json=args.json))


def _models_list(args: argparse.Namespace) -> int:
    models = importlib.import_module("agent.models_cli")
    return int(models.list_models(_load(args).settings, as_json=args.json))


def _models_sync(args: argparse.Namespace) -> int:
    loaded = _load(args)
    loaded.check_runnable()
    logs.configure("error", "console")
    models = importlib.import_module("agent.models_cli")
    return int(models.sync(loaded.settings, as_json=args.json))


def _models_prune(args: argparse.Namespace) -> int:
    loaded = _load(args)
    budget = args.budget if args.budget is not None else loaded.settings.models.budget_bytes
    if budget is None:
        raise ConfigError(
            "models.budget_bytes",
            loaded.source_of("models.budget_bytes"),
            "is unset: pass --budget",
        )
    models = importlib.import_module("agent.models_cli")
    return int(models.prune(loaded.settings, budget))


def _run(args: argparse.Namespace) -> int:
    loaded = _load(args)
    loaded.check_runnable()
    settings = loaded.settings
    logs.configure(settings.log_level, settings.log_format)
    log = logs.get_logger("agent.cli")
    for warning in loaded.warnings:
        log.warning("insecure_file_permissions", detail=warning)
    app = importlib.import_module("agent.app")  # late: only `run` needs the daemon's imports
    return int(app.run(settings))

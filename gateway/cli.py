"""``cyberun-gateway``: serve, mint credentials, approve device pairings, import workflows.

Stable command line (scripts and docs rely on it)::

    cyberun-gateway serve [--host 127.0.0.1] [--port 8080] [--data-dir DIR] [--public-url URL]
                          [--s3-endpoint URL --s3-bucket NAME]   (keys from the environment)
                          [--pair-ttl 300] [--max-pairings 1000]
    cyberun-gateway credentials create --data-dir DIR --team NAME --kind device|integration|agent
    cyberun-gateway credentials revoke --data-dir DIR --prefix PREFIX
    cyberun-gateway pair approve USER_CODE --team NAME [--data-dir DIR]
    cyberun-gateway workflows import FILE --data-dir DIR --team NAME

``serve`` prints ``cyberun-gateway listening on <url>`` once it accepts connections
(``--port 0`` picks a free port). ``credentials create`` prints only the secret.
``pair approve`` prints ``approved <USER_CODE> for team <NAME>``, or exits 1 with the reason
(unknown, expired or already approved) on stderr; it works on the database directly, also
while the server runs.
S3 keys come from ``CYBERUN_GATEWAY_S3_ACCESS_KEY`` / ``CYBERUN_GATEWAY_S3_SECRET_KEY``,
never from flags (argv is visible to every user of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from gateway.auth import CredentialKind, generate_secret
from gateway.config import GatewayConfig, Timeouts
from gateway.pairing import PairingError, parse_user_code
from gateway.storage import LocalStorage, ObjectStorage, S3Storage
from gateway.store import NotFoundError, SqliteStore, utcnow
from gateway.validation import ValidationFailure, check_workflow_targets

DEFAULT_DATA_DIR = Path("~/.local/share/cyberun-gateway")
KINDS = {
    "device": CredentialKind.DEVICE,
    "integration": CredentialKind.INTEGRATION,
    "agent": CredentialKind.AGENT,
}
EXIT_USAGE = 2
MIB = 1024 * 1024


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _part_size(value: str) -> int:
    size = int(value)
    if size < 5:
        raise argparse.ArgumentTypeError("parts must be at least 5 MiB (S3's minimum)")
    return size


def _data_dir(value: str | None) -> Path:
    path = Path(value).expanduser() if value else DEFAULT_DATA_DIR.expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path.resolve()


def _secret_file(path: Path, size: int = 32) -> bytes:
    """Read a key file, creating it (0600) with random bytes the first time."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        value = secrets.token_bytes(size)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(value)
        return value


def _open_store(data_dir: Path) -> SqliteStore:
    return SqliteStore(data_dir / "gateway.sqlite3")


def _storage(args: argparse.Namespace, data_dir: Path, public_url: str) -> ObjectStorage:
    if args.s3_endpoint:
        access = os.environ.get("CYBERUN_GATEWAY_S3_ACCESS_KEY", "")
        secret = os.environ.get("CYBERUN_GATEWAY_S3_SECRET_KEY", "")
        if not access or not secret:
            sys.exit("error: --s3-endpoint needs CYBERUN_GATEWAY_S3_ACCESS_KEY and _SECRET_KEY")
        s3 = S3Storage(args.s3_endpoint, args.s3_bucket, access, secret, region=args.s3_region)
        s3.ensure_bucket()
        return s3
    return LocalStorage(data_dir / "storage", public_url, _secret_file(data_dir / "storage.key"))


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway until SIGINT/SIGTERM."""
    import uvicorn  # noqa: PLC0415 - only the serve command needs the server

    from agent.logs import configure  # noqa: PLC0415
    from gateway.app import create_app  # noqa: PLC0415

    configure(args.log_level)
    data_dir = _data_dir(args.data_dir)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for a
    # listener created with it; with protocol 0 small answers waited ~40 ms (Nagle + delayed ACK)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue from now on; the URL below is already usable
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    public_url = (args.public_url or f"http://{host}:{port}").rstrip("/")
    config = GatewayConfig(
        data_dir=data_dir,
        public_url=public_url,
        jwt_key=_secret_file(data_dir / "jwt.key"),
        gateway_id=args.gateway_id,
        timeouts=Timeouts(
            ack_s=args.ack_timeout, lease_ttl_s=args.lease_ttl, heartbeat_interval_s=args.heartbeat
        ),
        multipart_threshold=args.multipart_threshold_mb * MIB,
        part_size=args.part_size_mb * MIB,
        comfy_cloud_url=args.comfy_cloud_url,
        comfy_cloud_key=os.environ.get("CYBERUN_GATEWAY_COMFY_CLOUD_API_KEY") or None,
        pair_ttl_s=args.pair_ttl,
        max_pending_pairings=args.max_pairings,
    )
    store = _open_store(data_dir)
    ready = f"cyberun-gateway listening on {public_url}"
    app = create_app(
        config,
        store,
        _storage(args, data_dir, public_url),
        on_ready=lambda: _ready(ready),
    )
    server_config = uvicorn.Config(
        app,
        ws="websockets-sansio",
        ws_max_size=config.max_frame_bytes,
        log_level=args.log_level.lower(),
        access_log=False,
        log_config=None,  # uvicorn logs through our structured, redacting logging
        lifespan="on",
    )
    server = uvicorn.Server(server_config)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        store.close()
    return 0


def _ready(line: str) -> None:
    """Startup is done: say so, and keep what start-up built out of the collector's way.

    ``gc.freeze`` moves every object alive now (the app, its routes and schemas: hundreds of
    thousands) to the permanent generation, so full collections no longer walk them; with a
    large fleet connected those collections were the gateway's longest pauses.
    """
    gc.freeze()
    print(line, flush=True)


def cmd_credentials_create(args: argparse.Namespace) -> int:
    """Create the team if needed and print a new secret (shown once, stored hashed)."""
    store = _open_store(_data_dir(args.data_dir))
    try:
        team = store.ensure_team(args.team)
        kind = KINDS[args.kind]
        secret, prefix, digest = generate_secret(kind)
        store.add_credential(team.id, kind, prefix, digest)
    finally:
        store.close()
    print(secret)
    return 0


def cmd_credentials_revoke(args: argparse.Namespace) -> int:
    """Revoke every credential whose display prefix matches."""
    store = _open_store(_data_dir(args.data_dir))
    try:
        count = store.revoke_prefix(args.prefix)
    finally:
        store.close()
    print(f"revoked {count} credential(s)")
    return 0 if count else 1


def cmd_pair_approve(args: argparse.Namespace) -> int:
    """Approve a device's pairing (by the user code it shows) into a team."""
    store = _open_store(_data_dir(args.data_dir))
    try:
        team = store.ensure_team(args.team)
        pairing = store.approve_pairing(parse_user_code(args.user_code), team.id, utcnow())
    except (LookupError, PairingError) as exc:  # NotFoundError is a LookupError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"approved {pairing.user_code} for team {args.team}")
    return 0


def cmd_workflows_import(args: argparse.Namespace) -> int:
    """Import a workflow file (JSON or YAML body of POST /workflows/import); print its id."""
    from gateway.models import WorkflowIn  # noqa: PLC0415

    text = Path(args.file).read_text(encoding="utf-8")
    try:
        body = WorkflowIn.model_validate(yaml.safe_load(text))
        check_workflow_targets(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        print(f"error: {args.file}: {where}: {first['msg']}", file=sys.stderr)
        return 1
    except ValidationFailure as exc:
        print(f"error: {args.file}: {exc.field}: {exc.message}", file=sys.stderr)
        return 1
    store = _open_store(_data_dir(args.data_dir))
    try:
        team = store.ensure_team(args.team)
        workflow = None
        if body.workflow_slug:
            try:
                current = store.workflow_by_slug(team.id, body.workflow_slug)
                workflow = store.update_workflow(team.id, current.id, body)
            except NotFoundError:
                workflow = None
        workflow = workflow or store.create_workflow(team.id, body)
    finally:
        store.close()
    print(
        json.dumps({"id": workflow.id, "version": workflow.version}) if args.json else workflow.id
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cyberun-gateway``."""
    parser = argparse.ArgumentParser(
        prog="cyberun-gateway", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway", allow_abbrev=False)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=int, default=8080, help="port (default 8080; 0 = any free port)"
    )
    serve.add_argument(
        "--data-dir", help=f"SQLite database, keys and local objects (default {DEFAULT_DATA_DIR})"
    )
    serve.add_argument(
        "--public-url", help="base URL clients and agents use (default http://HOST:PORT)"
    )
    serve.add_argument("--gateway-id", default="gw-local", help="reported as gateway_id on tasks")
    serve.add_argument(
        "--s3-endpoint", help="S3-compatible endpoint (default: embedded local storage)"
    )
    serve.add_argument("--s3-bucket", default="cyberun", help="bucket (created if missing)")
    serve.add_argument("--s3-region", default="us-east-1", help="SigV4 region")
    serve.add_argument(
        "--ack-timeout", type=float, default=10.0, help="seconds an agent has to ACK an assign"
    )
    serve.add_argument(
        "--lease-ttl",
        type=float,
        default=60.0,
        help="seconds without a heartbeat before a task is failed",
    )
    serve.add_argument(
        "--heartbeat", type=float, default=15.0, help="agents' status interval (seconds)"
    )
    serve.add_argument(
        "--comfy-cloud-url",
        help="ComfyUI-compatible endpoint for dispatch_target comfy_cloud "
        "(API key from CYBERUN_GATEWAY_COMFY_CLOUD_API_KEY); unset: comfy_cloud is refused",
    )
    serve.add_argument(
        "--multipart-threshold-mb",
        type=int,
        default=64,
        help="outputs larger than this are uploaded in parts (default 64)",
    )
    serve.add_argument(
        "--part-size-mb",
        type=_part_size,
        default=16,
        help="multipart part size, at least 5 (S3's minimum; default 16)",
    )
    serve.add_argument(
        "--pair-ttl",
        type=_positive,
        default=300,
        help="seconds a device pairing stays valid (expires_in; default 300)",
    )
    serve.add_argument(
        "--max-pairings",
        type=_positive,
        default=1000,
        help="pending device pairings allowed at once; more are refused with 429 (default 1000)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(handler=cmd_serve)

    creds = sub.add_parser("credentials", help="mint or revoke credentials", allow_abbrev=False)
    creds_sub = creds.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = creds_sub.add_parser(
        "create", help="create a credential; prints only the secret", allow_abbrev=False
    )
    create.add_argument("--data-dir", help="the gateway's data dir")
    create.add_argument("--team", required=True, help="team name (created if needed)")
    create.add_argument(
        "--kind",
        required=True,
        choices=sorted(KINDS),
        help="device (dk-), integration (sk-), agent (ak-)",
    )
    create.set_defaults(handler=cmd_credentials_create)
    revoke = creds_sub.add_parser(
        "revoke", help="revoke credentials by display prefix", allow_abbrev=False
    )
    revoke.add_argument("--data-dir", help="the gateway's data dir")
    revoke.add_argument(
        "--prefix", required=True, help="display prefix (first 10 characters of the secret)"
    )
    revoke.set_defaults(handler=cmd_credentials_revoke)

    pair = sub.add_parser("pair", help="device pairing", allow_abbrev=False)
    pair_sub = pair.add_subparsers(dest="action", required=True, metavar="ACTION")
    approve = pair_sub.add_parser(
        "approve", help="approve the code a device shows into a team", allow_abbrev=False
    )
    approve.add_argument("user_code", metavar="USER_CODE", help="e.g. AB7K-PNQ3 (any case)")
    approve.add_argument("--team", required=True, help="team name (created if needed)")
    approve.add_argument("--data-dir", help="the gateway's data dir")
    approve.set_defaults(handler=cmd_pair_approve)

    wfs = sub.add_parser("workflows", help="manage workflows", allow_abbrev=False)
    wfs_sub = wfs.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = wfs_sub.add_parser(
        "import", help="import a workflow file; prints its id", allow_abbrev=False
    )
    imp.add_argument("file", help="JSON or YAML body of POST /api/v1/workflows/import")
    imp.add_argument("--data-dir", help="the gateway's data dir")
    imp.add_argument("--team", required=True, help="team name (created if needed)")
    imp.add_argument("--json", action="store_true", help="print {id, version} as JSON")
    imp.set_defaults(handler=cmd_workflows_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cyberun-gateway``."""
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())

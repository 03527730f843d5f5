"""Gateway settings (built by ``gateway.cli`` from flags; tests build them directly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Timeouts:
    """Protocol timing the gateway enforces (seconds)."""

    handshake_s: float = 10.0
    """From WebSocket accept to ``hello``."""
    ack_s: float = 10.0
    """From ``task.assign`` to ``task.accept``/``task.reject``; then re-dispatch."""
    heartbeat_interval_s: float = 15.0
    """Sent in ``welcome``: how often agents send ``status``."""
    lease_ttl_s: float = 60.0
    """A running task not renewed for this long is failed "agent disconnected"."""


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway app needs besides its store and storage."""

    data_dir: Path
    public_url: str
    """Base URL clients and agents use (``http://127.0.0.1:8080``)."""
    jwt_key: bytes
    gateway_id: str = "gw-local"
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_frame_bytes: int = 1024 * 1024
    download_ttl_s: int = 3600
    upload_ttl_s: int = 3600
    input_ttl_s: int = 86_400
    """Inputs expire after a day (documented)."""
    max_file_bytes: int = 500 * 1024 * 1024
    """Default per-file cap of ``/r/files/presign`` (documented: 500 MB)."""
    model_download_ttl_s: int = 6 * 3600
    """Lifetime of the sync set's model download URLs (big files take a while)."""
    multipart_threshold: int = 64 * 1024 * 1024
    part_size: int = 16 * 1024 * 1024
    comfy_cloud_url: str | None = None
    """A ComfyUI-compatible endpoint for ``dispatch_target: comfy_cloud`` (None: refused)."""
    comfy_cloud_key: str | None = None
    """Its API key, sent as ``Authorization: Bearer``."""
    pair_ttl_s: int = 300
    """Device pairing: seconds a pairing lives (``expires_in``; documented: 300)."""
    pair_interval_s: int = 2
    """Device pairing: seconds a device waits between polls (``interval``; documented: 2)."""
    max_pending_pairings: int = 1000
    """Device pairing: pending, unexpired pairings allowed at once (then 429)."""

"""The team model registry's rules: safe model paths, content keys, the sync set.

A registered model's bytes live at ``models/<team_id>/<sha256 hex>`` (keyed by content, so
two paths with the same bytes share one object). The *sync set* of a team is its active
models, ordered by ``model_type`` then ``model_path``, each with a fresh presigned GET
``download_url``; it goes to agents in ``welcome.sync`` and, whenever it changes, in a
``sync`` message. Workflows name models ``<model_type>/<model_path>``; a run resolves those
names to content hashes (``required_model_hashes``) for the scheduler's ``warm`` factor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.protocol.messages import SyncModel
from gateway.models import ModelRecord, ModelStatus
from gateway.storage import ObjectStorage
from gateway.store import Store
from gateway.validation import ValidationFailure

MODEL_DOWNLOAD_TTL_S = 6 * 3600
"""How long a sync set's download URLs stay valid (big files take a while)."""
MAX_MODELS_PER_TEAM = 256
"""Registered models per team (any status): keeps a ``sync`` message under 1 MiB."""
_DRIVE = re.compile(r"^[A-Za-z]:")


def check_model_path(path: str) -> str:
    """Return ``path`` when it is a safe relative path, else raise ``ValidationFailure``.

    The documented rule (the agent applies the same one before writing): relative (no
    leading ``/``, no drive letter), no backslash, no ``.``/``..`` segment, no empty segment
    (so no ``//`` and no trailing ``/``), no control character. Length is checked by the
    request model (1-256).
    """
    rules = (
        ("\\" in path, "backslash", "must not contain a backslash"),
        (path.startswith("/") or bool(_DRIVE.match(path)), "absolute", "must be relative"),
        (any(p in {".", ".."} for p in path.split("/")), "dot_segment", "must not contain . or .."),
        ("" in path.split("/"), "empty_segment", "must not contain empty segments"),
        (
            any(ord(c) < 32 or c == "\x7f" for c in path),
            "control_character",
            "must not contain control characters",
        ),
    )
    for broken, rule, what in rules:
        if broken:
            raise ValidationFailure("model_path", rule, f"model_path {what}")
    return path


def model_key(team_id: str, file_hash: str) -> str:
    """The object key of a team's model content (``file_hash`` is ``sha256:<hex>``)."""
    return f"models/{team_id}/{file_hash.removeprefix('sha256:')}"


def model_name(model: ModelRecord) -> str:
    """How workflows name a model in ``required_models``."""
    return f"{model.model_type}/{model.model_path}"


def sync_set(
    store: Store, storage: ObjectStorage, team_id: str, ttl_s: int = MODEL_DOWNLOAD_TTL_S
) -> list[SyncModel]:
    """The team's active models with fresh download URLs (by model_type, model_path)."""
    return [
        SyncModel(
            model_type=m.model_type,
            model_path=m.model_path,
            file_size=m.file_size,
            file_hash=m.file_hash,
            download_url=storage.presign_get(model_key(team_id, m.file_hash), expires_s=ttl_s)[0],
        )
        for m in store.models(team_id, ModelStatus.ACTIVE)
    ]


def required_hashes(store: Store, team_id: str, required: Iterable[str]) -> list[str]:
    """Resolve ``<model_type>/<model_path>`` names to the active models' sha256 hex.

    An unknown or disabled name raises ``ValidationFailure`` on ``required_models``
    (rule ``model_not_found``), naming the first missing one.
    """
    active = {model_name(m): m.file_hash for m in store.models(team_id, ModelStatus.ACTIVE)}
    hashes: list[str] = []
    for name in required:
        found = active.get(name)
        if found is None:
            raise ValidationFailure(
                "required_models",
                "model_not_found",
                f"required model {name[:200]} is not an active model of this team",
            )
        hashes.append(found.removeprefix("sha256:"))
    return sorted(set(hashes))


__all__ = [
    "MAX_MODELS_PER_TEAM",
    "MODEL_DOWNLOAD_TTL_S",
    "check_model_path",
    "model_key",
    "model_name",
    "required_hashes",
    "sync_set",
]

"""Safe extraction of input archives (a zip of images for Nerfstudio) into a task workspace.

What it owns: turning one local zip file into plain files under one destination directory,
and nothing else: it never writes outside that directory, never follows or creates links,
never applies permission bits or timestamps from the archive, and does not extract nested
archives (an ``inner.zip`` member is written as a file like any other).

Before anything is written, every member is checked: the entry count (``max_entries``), its
name (relative, ``/``-separated, no ``..``, no backslash, no drive letter, no control
character; each segment passes ``agent.transfer.safe_name``; at most ``max_depth``
segments), its type (a regular file or a directory: no symlinks, devices or FIFOs), no
encryption, a supported method (stored or deflated only: those decompress in bounded
steps), and no two members that would land on the same path, compared after Unicode NFC and
case folding (a file ``a`` against a directory ``a/`` too). Sizes are then enforced *while*
decompressing, on the bytes actually produced, never on the sizes the headers declare:
an entry over ``max_entry_bytes``, an entry whose output exceeds ``max_ratio`` times its
compressed size once past its first MiB, or a running total over ``max_total_bytes`` stops
the extraction at once. Memory stays bounded (``CHUNK_SIZE`` reads and writes).

Atomicity: files are written into a fresh hidden temporary directory inside ``dest`` and
moved into place only when every member was extracted. On any failure (or interruption)
everything written is removed and ``dest`` is left as it was: still empty, or absent when
this call created it. Files are created 0600 and directories 0700. Files are not fsynced.

Errors: a refused or unreadable archive raises ``ArchiveError`` (``code``: ``unsafe_archive``,
``archive_too_large`` or ``bad_archive``; never retryable). A ``dest`` that is not an empty
directory raises ``ValueError``; local disk failures (``OSError``: a missing archive, disk
full) propagate unchanged, after the cleanup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from agent.errors import AgentError
from agent.transfer import CHUNK_SIZE, TransferError, safe_name

__all__ = ["DEFAULT_LIMITS", "ArchiveError", "ArchiveErrorCode", "ArchiveLimits", "extract_zip"]

RATIO_GRACE_BYTES = 1024 * 1024  # an entry's first MiB may compress arbitrarily well
_SUPPORTED_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_ENCRYPTED_FLAG = 0x1
_SHOWN_NAME = 120  # characters of a hostile member name quoted in a message
_CORRUPT = (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError)

ArchiveErrorCode = Literal["unsafe_archive", "archive_too_large", "bad_archive"]


class ArchiveError(AgentError):
    """An archive was refused or could not be read; ``code`` says which, never retryable.

    - ``unsafe_archive``: a member name or type that could write outside ``dest`` or collide.
    - ``archive_too_large``: too many entries, or an entry or the total too large (a bomb).
    - ``bad_archive``: not a zip, corrupt (CRC, truncated), encrypted, unsupported method.

    ``retryable`` mirrors ``TransferError.retryable`` so a caller handles both alike.
    """

    retryable = False

    def __init__(self, code: ArchiveErrorCode, message: str) -> None:
        """Record the code; the message names the member and the rule it broke."""
        super().__init__(message)
        self.code: ArchiveErrorCode = code


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may contain; sizes count uncompressed bytes as actually written."""

    max_entries: int = 10_000
    max_total_bytes: int = 20 * 1024**3
    max_entry_bytes: int = 4 * 1024**3
    max_ratio: float = 200.0  # uncompressed / compressed per entry, past RATIO_GRACE_BYTES
    max_depth: int = 16  # path segments of a member name


DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    parts: tuple[str, ...]
    is_dir: bool


def extract_zip(archive: Path, dest: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> list[Path]:
    """Extract the zip ``archive`` into ``dest`` and return the files written, in archive order.

    ``dest`` must be an empty directory or not exist (its parent must); the rules, errors and
    cleanup are those of the module docstring. Blocking: call it from a worker thread.
    """
    existed = _check_dest(dest)
    with archive.open("rb") as raw, _translated(archive):
        size = os.fstat(raw.fileno()).st_size
        with zipfile.ZipFile(raw) as zf:
            members = _plan(zf.infolist(), size, limits)
            if not existed:
                dest.mkdir(mode=0o700)
            try:
                return _extract_and_move(zf, members, dest, limits)
            except BaseException:
                if not existed:
                    shutil.rmtree(dest, ignore_errors=True)
                raise


def _check_dest(dest: Path) -> bool:
    """Return whether ``dest`` exists (as an empty directory); refuse anything else."""
    if not dest.exists() and not dest.is_symlink():
        return False
    if dest.is_symlink() or not dest.is_dir():
        raise ValueError(f"{dest} is not a directory")
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    return True


@contextlib.contextmanager
def _translated(archive: Path) -> Iterator[None]:
    """Translate zipfile's and zlib's errors about a corrupt archive into ``bad_archive``."""
    try:
        yield
    except _CORRUPT as exc:
        raise ArchiveError("bad_archive", f"{archive.name}: not a readable zip: {exc}") from exc


# ------------------------------------------------------------------------------ checks


def _plan(infos: list[zipfile.ZipInfo], archive_size: int, limits: ArchiveLimits) -> list[_Member]:
    """Check every member before anything is written; return them in archive order."""
    if len(infos) > limits.max_entries:
        raise ArchiveError(
            "archive_too_large", f"{len(infos)} entries, more than {limits.max_entries}"
        )
    members = []
    for info in infos:
        _check_entry(info, archive_size)
        members.append(_Member(info, _parts(info.orig_filename, limits.max_depth), info.is_dir()))
    _check_collisions(members)
    return members


def _check_entry(info: zipfile.ZipInfo, archive_size: int) -> None:
    """Refuse links and special files, encryption, odd methods, data past the archive end."""
    name = _shown(info.orig_filename)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in {0, stat.S_IFREG, stat.S_IFDIR} or (
        kind == stat.S_IFDIR and not info.is_dir()
    ):
        raise ArchiveError("unsafe_archive", f"member {name} is a symlink or special file")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise ArchiveError("bad_archive", f"member {name} is encrypted")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise ArchiveError(
            "bad_archive", f"member {name}: compression method {info.compress_type} unsupported"
        )
    if info.header_offset + info.compress_size > archive_size:
        raise ArchiveError("bad_archive", f"member {name} claims data past the archive's end")


def _parts(name: str, max_depth: int) -> tuple[str, ...]:
    """Return the path segments of a member name, refusing anything but a plain relative path."""
    if name.startswith("/") or "\\" in name:
        raise ArchiveError(
            "unsafe_archive", f"member {_shown(name)}: absolute path or backslash separator"
        )
    parts = tuple(name.removesuffix("/").split("/"))
    if len(parts) > max_depth:
        raise ArchiveError(
            "unsafe_archive", f"member {_shown(name)}: deeper than {max_depth} segments"
        )
    for part in parts:
        try:
            safe_name(part)
        except TransferError as exc:
            raise ArchiveError("unsafe_archive", f"member {_shown(name)}: {exc}") from exc
    return parts


def _check_collisions(members: list[_Member]) -> None:
    """Refuse two members on one path (NFC + case folded), or a file where a directory goes."""
    seen: set[str] = set()
    files: dict[str, str] = {}
    dirs: set[str] = set()
    for member in members:
        key = _key(member.parts)
        if key in seen:
            raise ArchiveError(
                "unsafe_archive", f"member {_shown(member.info.orig_filename)} is a duplicate"
            )
        seen.add(key)
        if not member.is_dir:
            files[key] = member.info.orig_filename
        dirs.update(_key(member.parts[:depth]) for depth in range(1, len(member.parts)))
    clash = sorted(files.keys() & dirs)
    if clash:
        raise ArchiveError(
            "unsafe_archive", f"member {_shown(files[clash[0]])} is both a file and a directory"
        )


def _key(parts: tuple[str, ...]) -> str:
    return unicodedata.normalize("NFC", "/".join(parts)).casefold()


def _shown(name: str) -> str:
    return repr(name[:_SHOWN_NAME]) + ("…" if len(name) > _SHOWN_NAME else "")


# ------------------------------------------------------------------------------ writing


def _extract_and_move(
    zf: zipfile.ZipFile, members: list[_Member], dest: Path, limits: ArchiveLimits
) -> list[Path]:
    """Extract into a temporary directory inside ``dest``, then move its entries up."""
    temp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    moved: list[Path] = []
    try:
        written = _extract_all(zf, members, temp, limits)
        for top in dict.fromkeys(member.parts[0] for member in members):
            target = dest / top
            if target.is_symlink() or target.exists():
                raise ArchiveError("unsafe_archive", f"member {_shown(top)} collides in {dest}")
            (temp / top).rename(target)
            moved.append(target)
        temp.rmdir()
    except BaseException:
        _remove([temp, *moved])
        raise
    return [dest / path.relative_to(temp) for path in written]


def _extract_all(
    zf: zipfile.ZipFile, members: list[_Member], root: Path, limits: ArchiveLimits
) -> list[Path]:
    """Write every member under ``root``; return the files, in archive order."""
    made: set[Path] = {root}
    written: list[Path] = []
    total = 0
    for member in members:
        target = root.joinpath(*member.parts)
        _make_dirs(target if member.is_dir else target.parent, made)
        if member.is_dir:
            continue
        if not target.resolve().is_relative_to(root.resolve()):  # cannot happen after _parts
            raise ArchiveError("unsafe_archive", f"member {_shown(member.info.orig_filename)}")
        total = _write_file(zf, member.info, target, total, limits)
        written.append(target)
    return written


def _make_dirs(directory: Path, made: set[Path]) -> None:
    """Create ``directory`` and its missing parents (under the root in ``made``), mode 0700."""
    missing = []
    while directory not in made:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # whatever the umask
        made.add(path)


def _write_file(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, total: int, limits: ArchiveLimits
) -> int:
    """Stream one member into a new 0600 file, checking sizes per chunk; return the new total."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(target, flags, 0o600), "wb") as out, zf.open(info) as source:
        os.fchmod(out.fileno(), 0o600)
        return _copy(source, out, info, total, limits)


def _copy(
    source: BinaryIO, out: BinaryIO, info: zipfile.ZipInfo, total: int, limits: ArchiveLimits
) -> int:
    size = 0
    while chunk := source.read(CHUNK_SIZE):
        size += len(chunk)
        total += len(chunk)
        _check_sizes(info, size, total, limits)
        out.write(chunk)
    return total


def _check_sizes(info: zipfile.ZipInfo, size: int, total: int, limits: ArchiveLimits) -> None:
    """Refuse, mid-entry, an entry too large or too compressed, or a total too large."""
    name = _shown(info.orig_filename)
    if size > limits.max_entry_bytes:
        raise ArchiveError(
            "archive_too_large", f"member {name} exceeds {limits.max_entry_bytes} bytes"
        )
    if size > RATIO_GRACE_BYTES and size > limits.max_ratio * max(info.compress_size, 1):
        raise ArchiveError(
            "archive_too_large",
            f"member {name} expands more than {limits.max_ratio:g}x (a zip bomb)",
        )
    if total > limits.max_total_bytes:
        raise ArchiveError(
            "archive_too_large", f"the archive expands past {limits.max_total_bytes} bytes"
        )


def _remove(paths: list[Path]) -> None:
    """Delete what this extraction wrote (files and directories it created; no links)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

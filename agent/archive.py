"""Safe extraction of input archives (a zip of images for Nerfstudio) into a task workspace.

What it owns: turning one local zip into plain files under one directory, ``dest``. It never
writes outside it, never creates or follows links, applies no permission bits or timestamps
from the archive (files 0600, directories 0700) and does not open nested archives.

Before anything is written: the end record's entry count and central directory size, then
every member: a plain relative ``/``-separated name (no ``..``, backslash, drive, control
character; each segment passes ``transfer.safe_name``; at most ``max_depth`` segments), a
regular file or directory (no symlink, device, FIFO), not encrypted, stored or deflated (the
methods zipfile decompresses in bounded steps), and no two members on one path after NFC and
case folding (nor a file where a directory goes). While decompressing, on the bytes actually
produced (headers are not trusted): an entry over ``max_entry_bytes``, or over ``max_ratio``
times its compressed size once past its first MiB, or a total over ``max_total_bytes`` stops
at once. Memory stays bounded (``CHUNK_SIZE`` reads and writes).

Atomicity: members go into a fresh temporary directory inside ``dest``, moved into place once
all are written. On any failure or interruption everything written is removed and ``dest`` is
left as it was (empty, or absent when this call created it). Files are not fsynced.

Errors: ``ArchiveError`` (``unsafe_archive``, ``archive_too_large``, ``bad_archive``; never
retryable). A ``dest`` that is not an empty directory: ``ValueError``. Local disk failures
(``OSError``: a missing archive, disk full) propagate unchanged, after the cleanup.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tempfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from agent.errors import AgentError
from agent.transfer import CHUNK_SIZE, TransferError, safe_name

__all__ = ["DEFAULT_LIMITS", "ArchiveError", "ArchiveErrorCode", "ArchiveLimits", "extract_zip"]

RATIO_GRACE_BYTES = 1024 * 1024  # an entry's first MiB may compress arbitrarily well
_SUPPORTED_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_ENCRYPTED_FLAG = 0x1
_SHOWN_NAME = 120  # characters of a hostile member name quoted in a message
_DIRECTORY_BYTES_PER_ENTRY = 1024  # central directory allowance per allowed entry (names…)
_TAIL_BYTES = 22 + 0xFFFF + 76  # end record, longest comment, zip64 record and locator
_CORRUPT = (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, UnicodeDecodeError)

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
        _check_directory(raw, size, limits)
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


def _check_directory(raw: IO[bytes], size: int, limits: ArchiveLimits) -> None:
    """Refuse an end record declaring too many entries or too big a central directory.

    zipfile parses the whole central directory into memory before its count can be checked;
    this reads the end record (and its zip64 form) the way zipfile finds them, so a directory
    of millions of tiny entries is refused first. No end record: zipfile reports it.
    """
    raw.seek(max(0, size - _TAIL_BYTES))
    tail = raw.read()
    raw.seek(0)
    end = len(tail) - 22
    if not (tail[end:].startswith(b"PK\x05\x06") and tail[-2:] == b"\0\0"):
        end = tail.rfind(b"PK\x05\x06")
    if not 0 <= end <= len(tail) - 22:
        return
    count, directory = struct.unpack_from("<HI", tail, end + 10)
    if end >= 76 and tail[end - 20 : end - 16] == b"PK\x06\x07":  # zip64 locator
        count, directory = struct.unpack_from("<QQ", tail, end - 76 + 32)
    if count > limits.max_entries or directory > limits.max_entries * _DIRECTORY_BYTES_PER_ENTRY:
        raise ArchiveError(
            "archive_too_large",
            f"the central directory declares {count} entries in {directory} bytes, "
            f"more than {limits.max_entries} entries allow",
        )


def _plan(infos: list[zipfile.ZipInfo], archive_size: int, limits: ArchiveLimits) -> list[_Member]:
    """Check every member before anything is written; return them in archive order."""
    if len(infos) > limits.max_entries:
        raise ArchiveError("archive_too_large", f"{len(infos)} entries, over {limits.max_entries}")
    members = []
    for info in infos:
        _check_entry(info, archive_size)
        members.append(_Member(info, _parts(info.orig_filename, limits.max_depth), info.is_dir()))
    _check_collisions(members)
    return members


def _check_entry(info: zipfile.ZipInfo, archive_size: int) -> None:
    """Refuse links and special files, encryption, odd methods, data past the archive end."""
    name = info.orig_filename
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind not in {0, stat.S_IFREG, stat.S_IFDIR} or (kind == stat.S_IFDIR and not info.is_dir()):
        raise _refused("unsafe_archive", name, "is a symlink or special file")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise _refused("bad_archive", name, "is encrypted")
    if info.compress_type not in _SUPPORTED_METHODS:
        raise _refused("bad_archive", name, f"uses unsupported method {info.compress_type}")
    if not 0 <= info.header_offset <= archive_size - info.compress_size:
        raise _refused("bad_archive", name, "claims data outside the archive")


def _parts(name: str, max_depth: int) -> tuple[str, ...]:
    """Return the path segments of a member name, refusing anything but a plain relative path."""
    if name.startswith("/") or "\\" in name:
        raise _refused("unsafe_archive", name, "is absolute or uses backslash separators")
    parts = tuple(name.removesuffix("/").split("/"))
    if len(parts) > max_depth:
        raise _refused("unsafe_archive", name, f"is deeper than {max_depth} segments")
    for part in parts:
        try:
            safe_name(part)
        except TransferError as exc:
            raise _refused("unsafe_archive", name, f"is refused: {str(exc)[:300]}") from exc
    return parts


def _check_collisions(members: list[_Member]) -> None:
    """Refuse two members on one path (NFC + case folded), or a file where a directory goes."""
    seen: set[str] = set()
    files: dict[str, str] = {}
    dirs: set[str] = set()
    for member in members:
        key = _key(member.parts)
        if key in seen:
            raise _refused("unsafe_archive", member.info.orig_filename, "is a duplicate")
        seen.add(key)
        if not member.is_dir:
            files[key] = member.info.orig_filename
        dirs.update(_key(member.parts[:depth]) for depth in range(1, len(member.parts)))
    clash = sorted(files.keys() & dirs)
    if clash:
        raise _refused("unsafe_archive", files[clash[0]], "is both a file and a directory")


def _key(parts: tuple[str, ...]) -> str:
    return unicodedata.normalize("NFC", "/".join(parts)).casefold()


def _refused(code: ArchiveErrorCode, name: str, why: str) -> ArchiveError:
    """Return the error for member ``name`` (quoted, cut to ``_SHOWN_NAME`` characters)."""
    shown = repr(name[:_SHOWN_NAME]) + ("…" if len(name) > _SHOWN_NAME else "")
    return ArchiveError(code, f"member {shown} {why}")


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
            _move(temp / top, dest / top, moved)
        temp.rmdir()
    except BaseException:
        _remove([temp, *moved])
        raise
    return [dest / path.relative_to(temp) for path in written]


def _move(source: Path, target: Path, moved: list[Path]) -> None:
    """Rename ``source`` to ``target`` (which must not exist) and record it in ``moved``."""
    if target.is_symlink() or target.exists():  # only our own temp dir's name could be there
        raise _refused("unsafe_archive", target.name, f"collides in {target.parent}")
    source.rename(target)
    moved.append(target)


def _extract_all(
    zf: zipfile.ZipFile, members: list[_Member], root: Path, limits: ArchiveLimits
) -> list[Path]:
    """Write every member under ``root``; return the files, in archive order."""
    made: set[Path] = {root}
    written: list[Path] = []
    total = 0
    real_root = root.resolve()
    for member in members:
        target = root.joinpath(*member.parts)
        _make_dirs(target if member.is_dir else target.parent, made)
        if member.is_dir:
            continue
        if not target.resolve().is_relative_to(real_root):  # cannot happen after _parts
            raise _refused("unsafe_archive", member.info.orig_filename, "resolves outside")
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
        new_total = _copy(source, out, info, total, limits)
    if new_total - total != info.file_size:  # zipfile stops at the declared size; never past
        raise _refused("bad_archive", info.orig_filename, "is shorter than its header says")
    return new_total


def _copy(
    source: IO[bytes], out: IO[bytes], info: zipfile.ZipInfo, total: int, limits: ArchiveLimits
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
    name = info.orig_filename
    if size > limits.max_entry_bytes:
        raise _refused("archive_too_large", name, f"exceeds {limits.max_entry_bytes} bytes")
    if size > RATIO_GRACE_BYTES and size > limits.max_ratio * max(info.compress_size, 1):
        raise _refused("archive_too_large", name, f"expands over {limits.max_ratio:g}x (a bomb)")
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

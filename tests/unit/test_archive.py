"""Safe zip extraction: normal archives, zip-slip names, links, bombs, lying headers, corrupt files.

Every archive is built here with ``zipfile``; hostile ones are written from hand-made
``ZipInfo`` entries or patched bytes. Each refusal also checks that nothing was written:
``dest`` (and the whole sandbox around it) is exactly as it was before the call.
"""

from __future__ import annotations

import hashlib
import stat
import struct
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.archive import ArchiveError, ArchiveLimits, extract_zip

MIB = 1024 * 1024
BOMB_BYTES = 200 * MIB


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    """Write a plain deflated zip of ``entries`` (name → content) and return its path."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def make_raw(path: Path, *infos: tuple[zipfile.ZipInfo, bytes]) -> Path:
    """Write a zip from hand-made ``ZipInfo`` entries, names and attributes kept verbatim."""
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        for info, data in infos:
            zf.writestr(info, data)
    return path


def entry(name: str, *, mode: int = 0, method: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    """A ``ZipInfo`` named exactly ``name`` with the given Unix mode in its external attrs."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    info.compress_type = method
    return info


def patch(path: Path, signature: bytes, offset: int, fmt: str, value: int) -> None:
    """Overwrite a field at ``offset`` after every ``signature`` (local or central header)."""
    data = bytearray(path.read_bytes())
    start = data.find(signature)
    assert start >= 0
    while start >= 0:
        struct.pack_into(fmt, data, start + offset, value)
        start = data.find(signature, start + 1)
    path.write_bytes(bytes(data))


LOCAL, CENTRAL = b"PK\x03\x04", b"PK\x01\x02"


def noise(size: int) -> bytes:
    """Incompressible but deterministic bytes (so header patches find exact patterns)."""
    blocks = (hashlib.sha256(n.to_bytes(8, "little")).digest() for n in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def tree(root: Path) -> set[str]:
    """Every path under ``root``, relative, directories included."""
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def refuse(
    archive: Path, dest: Path, code: str, limits: ArchiveLimits | None = None
) -> ArchiveError:
    """Assert extraction fails with ``code`` and leaves the sandbox around ``dest`` unchanged."""
    sandbox = dest.parent.parent
    before = tree(sandbox)
    with pytest.raises(ArchiveError) as caught:
        extract_zip(archive, dest, limits or ArchiveLimits())
    assert caught.value.code == code
    assert caught.value.retryable is False
    assert tree(sandbox) == before
    return caught.value


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """A destination two levels inside the sandbox, so escapes one level up are visible."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work" / "dest"


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image, then 200 MiB of zeros deflated to ~200 KiB, written in streamed chunks."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images/a.png", b"\x89PNG" + bytes(range(256)))
        with zf.open("images/zeros.png", "w", force_zip64=True) as out:
            zero = bytes(MIB)
            for _ in range(BOMB_BYTES // MIB):
                out.write(zero)
    return path


def test_normal_archive_extracts(tmp_path: Path, dest: Path) -> None:
    """A zip of images/ plus transforms.json extracts with the same names and contents."""
    entries = {
        "transforms.json": b'{"frames": []}',
        "images/frame_00001.png": noise(3000),
        "images/frame_00002.png": bytes(5000),
    }
    archive = make_zip(tmp_path / "in.zip", {"images/": b"", **entries})
    files = extract_zip(archive, dest)
    assert files == [dest / name for name in entries]
    assert {name: (dest / name).read_bytes() for name in entries} == entries
    assert tree(dest) == {"images", *entries}


def test_empty_archive_extracts_nothing(tmp_path: Path, dest: Path) -> None:
    """A valid zip without members yields an empty destination and no files."""
    assert extract_zip(make_zip(tmp_path / "in.zip", {}), dest) == []
    assert tree(dest) == set()


def test_existing_empty_dest_is_used(tmp_path: Path, dest: Path) -> None:
    """An existing empty directory is a valid destination and receives the files."""
    dest.mkdir()
    extract_zip(make_zip(tmp_path / "in.zip", {"a.png": b"x"}), dest)
    assert tree(dest) == {"a.png"}


def test_non_empty_or_file_dest_is_refused(tmp_path: Path, dest: Path) -> None:
    """A destination that is a file or a non-empty directory is a caller error (ValueError)."""
    archive = make_zip(tmp_path / "in.zip", {"a.png": b"x"})
    dest.mkdir()
    (dest / "old.txt").write_bytes(b"keep")
    with pytest.raises(ValueError, match="not empty"):
        extract_zip(archive, dest)
    with pytest.raises(ValueError, match="not a directory"):
        extract_zip(archive, dest / "old.txt")
    assert tree(dest) == {"old.txt"}


def test_archive_modes_and_times_are_not_applied(tmp_path: Path, dest: Path) -> None:
    """Files are 0600 and directories 0700 with fresh mtimes, whatever the archive says."""
    archive = make_raw(
        tmp_path / "in.zip",
        (entry("d/", mode=stat.S_IFDIR | 0o777), b""),
        (entry("d/run.sh", mode=stat.S_IFREG | 0o4777), b"#!/bin/sh\n"),
    )
    extract_zip(archive, dest)
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "d" / "run.sh").stat().st_mode) == 0o600
    assert (dest / "d" / "run.sh").stat().st_mtime > time.time() - 60


def test_nested_archive_is_not_extracted(tmp_path: Path, dest: Path) -> None:
    """A zip inside the zip is written as one file, never opened."""
    inner = make_zip(tmp_path / "inner.zip", {"../evil.txt": b"x"}).read_bytes()
    extract_zip(make_zip(tmp_path / "in.zip", {"inner.zip": inner}), dest)
    assert tree(dest) == {"inner.zip"}


@pytest.mark.parametrize(
    "name",
    [
        "../evil.txt",
        "/abs.txt",
        "a/../../b",
        "C:\\x",
        "C:/x",
        "a\\b",
        "..\\evil.txt",
        "a//b",
        "./a",
        "a/\x01b",
        "CON.png",
        "/",
    ],
)
def test_zip_slip_names_are_refused(tmp_path: Path, dest: Path, name: str) -> None:
    """Names that are absolute, climb, use backslashes or drives, or are odd are refused."""
    archive = make_raw(tmp_path / "in.zip", (entry("ok.png"), b"fine"), (entry(name), b"evil"))
    refuse(archive, dest, "unsafe_archive")
    assert not dest.exists()


def test_nul_in_a_name_is_refused(tmp_path: Path, dest: Path) -> None:
    """A NUL byte in a stored name (which zipfile would silently truncate) is refused."""
    info = entry("placeholder")
    info.filename = "evil.txt\x00.png"
    refuse(make_raw(tmp_path / "in.zip", (info, b"x")), dest, "unsafe_archive")


def test_refusal_leaves_an_existing_dest_empty(tmp_path: Path, dest: Path) -> None:
    """A refused archive leaves an existing empty destination existing and empty."""
    dest.mkdir()
    refuse(make_raw(tmp_path / "in.zip", (entry("../evil.txt"), b"x")), dest, "unsafe_archive")
    assert dest.is_dir()


@pytest.mark.parametrize("kind", [stat.S_IFLNK, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK])
def test_symlinks_and_special_files_are_refused(tmp_path: Path, dest: Path, kind: int) -> None:
    """A member whose external attributes say symlink, FIFO or device is refused."""
    archive = make_raw(tmp_path / "in.zip", (entry("link.png", mode=kind | 0o777), b"/etc/passwd"))
    refuse(archive, dest, "unsafe_archive")


def test_directory_mode_on_a_file_name_is_refused(tmp_path: Path, dest: Path) -> None:
    """A member marked as a directory whose name is not one is refused."""
    archive = make_raw(tmp_path / "in.zip", (entry("d", mode=stat.S_IFDIR | 0o755), b""))
    refuse(archive, dest, "unsafe_archive")


def test_too_deep_names_are_refused(tmp_path: Path, dest: Path) -> None:
    """A member with more path segments than max_depth is refused; max_depth itself passes."""
    archive = make_zip(tmp_path / "in.zip", {"a/b/c/d.png": b"x"})
    refuse(archive, dest, "unsafe_archive", ArchiveLimits(max_depth=3))
    assert extract_zip(archive, dest, ArchiveLimits(max_depth=4)) == [dest / "a/b/c/d.png"]


@pytest.mark.parametrize(
    "names",
    [
        ["a.png", "A.png"],
        ["a.png", "a.png"],
        ["images/x.png", "IMAGES/x.png"],
        ["caf\u00e9.png", "cafe\u0301.png"],  # NFC and NFD spellings
        ["a", "a/b.png"],
        ["d/a", "D/A/b.png"],
        ["d/", "d/"],
    ],
)
def test_colliding_names_are_refused(tmp_path: Path, dest: Path, names: list[str]) -> None:
    """Two members on one path (case, Unicode form) or a file under a file are refused."""
    archive = make_raw(tmp_path / "in.zip", *((entry(name), b"x") for name in names))
    refuse(archive, dest, "unsafe_archive")


def test_too_many_entries_are_refused_before_extraction(tmp_path: Path, dest: Path) -> None:
    """More entries than max_entries fails before anything is created; the cap itself passes."""
    archive = make_zip(tmp_path / "in.zip", {f"{n}.png": b"x" for n in range(4)})
    refuse(archive, dest, "archive_too_large", ArchiveLimits(max_entries=3))
    assert not dest.exists()
    assert len(extract_zip(archive, dest, ArchiveLimits(max_entries=4))) == 4


def set_declared_count(archive: Path, count: int) -> None:
    """Make the (plain) end record declare ``count`` entries, whatever the directory holds."""
    data = bytearray(archive.read_bytes())
    struct.pack_into("<HH", data, data.rfind(b"PK\x05\x06") + 8, count, count)
    archive.write_bytes(bytes(data))


def test_oversized_central_directory_is_refused_before_parsing(tmp_path: Path, dest: Path) -> None:
    """An end record understating its entries cannot hide a directory too big to parse."""
    archive = make_zip(tmp_path / "in.zip", {f"{n}.png": b"" for n in range(500)})
    set_declared_count(archive, 5)
    error = refuse(archive, dest, "archive_too_large", ArchiveLimits(max_entries=10))
    assert "central directory" in str(error)


def test_understated_entry_count_is_caught_after_parsing(tmp_path: Path, dest: Path) -> None:
    """Entries hidden behind a small declared count are still counted once parsed."""
    archive = make_zip(tmp_path / "in.zip", {f"{n}.png": b"" for n in range(100)})
    set_declared_count(archive, 5)
    error = refuse(archive, dest, "archive_too_large", ArchiveLimits(max_entries=50))
    assert "100 entries" in str(error)


def test_zip64_end_record_is_checked(
    tmp_path: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry count of a zip64 end record is checked too; such an archive still extracts."""
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)  # zipfile writes zip64 end records
    archive = make_zip(tmp_path / "in.zip", {f"{n}.png": b"x" for n in range(5)})
    monkeypatch.undo()
    assert b"PK\x06\x06" in archive.read_bytes()
    error = refuse(archive, dest, "archive_too_large", ArchiveLimits(max_entries=4))
    assert "central directory declares 5 entries" in str(error)
    assert len(extract_zip(archive, dest, ArchiveLimits(max_entries=5))) == 5


def test_zip_bomb_is_refused_by_ratio(bomb: Path, dest: Path) -> None:
    """200 MiB of zeros fail the default ratio check long before their end; output removed."""
    started = time.monotonic()
    refuse(bomb, dest, "archive_too_large")
    assert time.monotonic() - started < 5
    assert not dest.exists()


def test_zip_bomb_is_refused_by_entry_size(bomb: Path, dest: Path) -> None:
    """With the ratio check off, max_entry_bytes stops the bomb mid-entry; output removed."""
    dest.mkdir()
    limits = ArchiveLimits(max_ratio=float("inf"), max_entry_bytes=8 * MIB)
    refuse(bomb, dest, "archive_too_large", limits)
    assert list(dest.iterdir()) == []


def test_total_size_is_capped(tmp_path: Path, dest: Path) -> None:
    """Entries each under the cap but together over max_total_bytes are refused."""
    archive = make_zip(tmp_path / "in.zip", {f"{n}.bin": noise(MIB) for n in range(3)})
    refuse(archive, dest, "archive_too_large", ArchiveLimits(max_total_bytes=2 * MIB + 1))
    assert len(extract_zip(archive, dest, ArchiveLimits(max_total_bytes=3 * MIB))) == 3


def test_small_compressible_file_passes_the_ratio_check(tmp_path: Path, dest: Path) -> None:
    """An entry under 1 MiB may compress beyond max_ratio (a blank mask image)."""
    extract_zip(make_zip(tmp_path / "in.zip", {"mask.png": bytes(MIB)}), dest)
    assert (dest / "mask.png").stat().st_size == MIB


@pytest.mark.parametrize("declared", [10, 2 * MIB, 3 * MIB + 1000])
def test_lying_size_header_is_refused(tmp_path: Path, dest: Path, declared: int) -> None:
    """A header declaring fewer or more bytes than the entry holds is refused, nothing kept."""
    archive = make_zip(tmp_path / "in.zip", {"a.png": b"x", "big.bin": noise(3 * MIB)})
    real, lie = struct.pack("<I", 3 * MIB), struct.pack("<I", declared)
    data = archive.read_bytes()
    assert data.count(real) == 2  # the local and the central header
    archive.write_bytes(data.replace(real, lie))
    refuse(archive, dest, "bad_archive")


def test_actual_size_is_enforced_mid_entry(tmp_path: Path, dest: Path) -> None:
    """An entry growing past max_entry_bytes is stopped while written; its partial file removed."""
    archive = make_zip(tmp_path / "in.zip", {"a.png": b"x", "big.bin": noise(3 * MIB)})
    refuse(archive, dest, "archive_too_large", ArchiveLimits(max_entry_bytes=2 * MIB))
    assert len(extract_zip(archive, dest, ArchiveLimits(max_entry_bytes=3 * MIB))) == 2


@pytest.mark.parametrize(
    "content",
    [b"", b"not a zip at all", b"PK\x05\x06" + bytes(10), noise(4096)],
)
def test_non_zip_files_are_bad_archives(tmp_path: Path, dest: Path, content: bytes) -> None:
    """Empty, text, a bare end record or random bytes are refused as bad_archive."""
    (tmp_path / "in.zip").write_bytes(content)
    refuse(tmp_path / "in.zip", dest, "bad_archive")


def test_truncated_and_bit_flipped_archives_are_bad(tmp_path: Path, dest: Path) -> None:
    """A zip cut short, or with a flipped data byte (CRC mismatch), is refused as bad_archive."""
    good = make_zip(tmp_path / "good.zip", {"a.bin": noise(100_000)}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])
    refuse(tmp_path / "cut.zip", dest, "bad_archive")
    flipped = bytearray(good)
    flipped[500] ^= 0xFF
    (tmp_path / "flip.zip").write_bytes(bytes(flipped))
    refuse(tmp_path / "flip.zip", dest, "bad_archive")


def test_invalid_utf8_name_is_a_bad_archive(tmp_path: Path, dest: Path) -> None:
    """A name flagged UTF-8 whose bytes are not UTF-8 is refused as bad_archive."""
    archive = make_zip(tmp_path / "in.zip", {"caf\u00e9.png": b"x"})
    archive.write_bytes(archive.read_bytes().replace(b"caf\xc3\xa9", b"caf\xc3("))
    refuse(archive, dest, "bad_archive")


def test_encrypted_member_is_refused(tmp_path: Path, dest: Path) -> None:
    """A member with the encryption flag set is refused without asking for a password."""
    archive = make_zip(tmp_path / "in.zip", {"a.png": b"secret"})
    patch(archive, LOCAL, 6, "<H", 0x1)
    patch(archive, CENTRAL, 8, "<H", 0x1)
    refuse(archive, dest, "bad_archive")


def test_unsupported_method_is_refused(tmp_path: Path, dest: Path) -> None:
    """Methods that decompress in unbounded steps (bzip2, lzma) are refused."""
    archive = make_raw(tmp_path / "in.zip", (entry("a.png", method=zipfile.ZIP_BZIP2), b"x"))
    refuse(archive, dest, "bad_archive")


def test_missing_archive_is_an_os_error(tmp_path: Path, dest: Path) -> None:
    """A missing archive file is a local failure (OSError), not an archive error."""
    with pytest.raises(FileNotFoundError):
        extract_zip(tmp_path / "missing.zip", dest)
    assert not dest.exists()


PLAIN = st.text(
    st.characters(codec="utf-8", categories=["L", "N"]) | st.sampled_from("._- ~"),
    min_size=1,
    max_size=8,
)
HOSTILE = st.one_of(
    st.sampled_from(["..", ".", "", "C:", "c:\\x", "\\", "/", "con", "a\x00b", "\x7f"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=8),
)
SEGMENTS = st.one_of(PLAIN, PLAIN, PLAIN, HOSTILE)  # mostly plain, so some archives succeed
NAMES = st.lists(SEGMENTS, min_size=1, max_size=3).map("/".join)


@settings(max_examples=200, deadline=None)
@given(names=st.lists(NAMES, min_size=1, max_size=4))
def test_arbitrary_names_never_escape(names: list[str]) -> None:
    """Whatever the member names, files land only under dest, or nothing is written at all."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        (sandbox / "work").mkdir()
        dest = sandbox / "work" / "dest"
        archive = make_raw(sandbox / "in.zip", *((entry(name), b"data") for name in names))
        try:
            files = extract_zip(archive, dest)
        except ArchiveError:
            assert tree(sandbox) == {"in.zip", "work"}
            return
        assert all(path.resolve().is_relative_to(dest.resolve()) for path in files)
        assert all(path.read_bytes() == b"data" for path in files)
        assert tree(sandbox) - {"in.zip", "work", "work/dest"} == {
            str(path.relative_to(sandbox)) for path in (dest.rglob("*"))
        }

"""Where a ComfyUI keeps its files, and removing one prompt's files from there safely.

A community task's traces in ComfyUI are the inputs the agent uploaded to ``input/`` and
the files its prompt wrote to ``output/`` and ``temp/`` (named by ``/history``). The names
come from ComfyUI — and through it from a stranger's graph — so every path is resolved and
refused unless it lies strictly inside its directory; a symlink is removed, never followed,
and directories are never removed recursively (only left empty ones, inside the root).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.runtimes.comfyui.workflow import OutputRef

_DIRECTORY_FLAGS = ("--base-directory", "--input-directory", "--output-directory")
_TEMP_FLAG = "--temp-directory"


@dataclass(frozen=True)
class ComfyDirectories:
    """A ComfyUI server's ``input/``, ``output/`` and ``temp/`` directories."""

    input: Path
    output: Path
    temp: Path

    @classmethod
    def under(cls, base: Path) -> ComfyDirectories:
        """The directories of a ComfyUI whose base directory is ``base``."""
        return cls(input=base / "input", output=base / "output", temp=base / "temp")

    def root(self, kind: str) -> Path | None:
        """The directory of a history item's ``type`` (``output``/``temp``/``input``)."""
        return {"output": self.output, "temp": self.temp, "input": self.input}.get(kind)


def directories_from_argv(argv: Sequence[str], cwd: Path) -> ComfyDirectories:
    """The directories ComfyUI's ``main.py`` (run in ``cwd``) uses with these arguments.

    Mirrors ComfyUI: the base is ``--base-directory`` or else ``main.py``'s folder;
    ``--input-directory`` and ``--output-directory`` replace ``input/`` and ``output/``;
    ``--temp-directory X`` makes the temp directory ``X/temp``. The last occurrence of a flag
    wins (as with argparse); ``--flag value`` and ``--flag=value`` are both understood,
    abbreviations are not. Relative paths are relative to ``cwd``.
    """
    found: dict[str, str] = {}
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name not in (*_DIRECTORY_FLAGS, _TEMP_FLAG):
            continue
        if equals:
            found[name] = value
        elif index + 1 < len(argv):
            found[name] = argv[index + 1]

    def path(flag: str, default: Path) -> Path:
        value = found.get(flag)
        return Path(os.path.abspath(cwd / value)) if value else default  # noqa: PTH100

    defaults = ComfyDirectories.under(path("--base-directory", Path(os.path.realpath(cwd))))
    return ComfyDirectories(
        input=path("--input-directory", defaults.input),
        output=path("--output-directory", defaults.output),
        temp=path(_TEMP_FLAG, defaults.temp.parent) / "temp",
    )


def resolve_inside(root: Path, subfolder: str, filename: str) -> Path | None:
    """The file ``root/subfolder/filename`` names, or ``None`` unless it is inside ``root``.

    The containing folder is resolved (symlinks and ``..`` followed) and must be ``root`` or
    below it; the last component is kept as is (a symlink there is the link itself), and
    must be a plain name. Absolute parts, NUL bytes and empty names are refused.
    """
    if not filename or "\x00" in filename or "\x00" in subfolder:
        return None
    relative = Path(subfolder) / filename if subfolder else Path(filename)
    if relative.is_absolute() or relative.name in ("", ".", ".."):
        return None
    real_root = Path(os.path.realpath(root))
    parent = Path(os.path.realpath(real_root / relative.parent))
    if parent != real_root and real_root not in parent.parents:
        return None
    return parent / relative.name


@dataclass
class Removed:
    """What one purge removed (counts only: names are a community task's private data)."""

    inputs: int = 0
    outputs: int = 0
    temp: int = 0
    refused: int = 0
    """Names that resolved outside their directory (or to a directory) and were left alone."""
    failed: int = 0

    def add(self, other: Removed) -> None:
        """Count ``other`` in too."""
        self.inputs += other.inputs
        self.outputs += other.outputs
        self.temp += other.temp
        self.refused += other.refused
        self.failed += other.failed


def remove_prompt_files(
    directories: ComfyDirectories,
    uploaded: Iterable[str],
    refs: Iterable[OutputRef],
    input_prefix: str | None = None,
) -> Removed:
    """Remove the uploaded inputs and the output/temp files of a prompt (blocking I/O).

    ``uploaded`` holds names as ComfyUI returned them (``sub/name`` or ``name``), relative
    to ``input/``; ``input_prefix`` also removes every file directly in ``input/`` whose
    name starts with it (uploads of a prompt the agent no longer remembers). Only ``output``
    and ``temp`` refs are removed: a prompt's history cannot make the agent delete inputs.
    """
    removed = Removed()
    inputs = {tuple(_split(name)) for name in uploaded}
    if input_prefix:
        with contextlib.suppress(OSError):
            inputs.update(
                ("", entry.name)
                for entry in os.scandir(directories.input)
                if entry.name.startswith(input_prefix)
            )
    for subfolder, filename in sorted(inputs):
        outcome = _remove(directories.input, subfolder, filename)
        removed.inputs += outcome == "removed"
        removed.refused += outcome == "refused"
        removed.failed += outcome == "failed"
    for ref in {(r.kind, r.subfolder, r.filename) for r in refs}:
        kind, subfolder, filename = ref
        root = directories.root(kind) if kind in ("output", "temp") else None
        if root is None:
            continue
        outcome = _remove(root, subfolder, filename)
        if outcome == "removed":
            if kind == "output":
                removed.outputs += 1
            else:
                removed.temp += 1
        removed.refused += outcome == "refused"
        removed.failed += outcome == "failed"
    return removed


def _split(name: str) -> tuple[str, str]:
    subfolder, _, filename = name.rpartition("/")
    return subfolder, filename


def _remove(root: Path, subfolder: str, filename: str) -> str:
    """``removed``, ``absent``, ``refused`` or ``failed``."""
    path = resolve_inside(root, subfolder, filename)
    if path is None or (path.is_dir() and not path.is_symlink()):
        return "refused"
    try:
        path.unlink()
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "failed"
    _prune_empty(Path(os.path.realpath(root)), path.parent)
    return "removed"


def _prune_empty(root: Path, folder: Path) -> None:
    """Remove ``folder`` and its parents while they are empty and strictly inside ``root``."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent

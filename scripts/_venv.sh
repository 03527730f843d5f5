# shellcheck shell=bash
# Sourced by scripts/*: creates (or refreshes) the project virtualenv in .venv with
# everything the project needs, using only Python >= 3.11 and PyPI. Re-installs when
# pyproject.toml changes (its hash is stored in the venv), so a fresh clone and a stale
# checkout both end up with the right dependencies.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CYBERUN_VENV:-$ROOT/.venv}"

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "error: Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

ensure_venv() {
    local extras="${1:-dev,gateway}"
    local stamp want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$extras"
    stamp="$VENV/.cyberun-stamp"
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtualenv $VENV" >&2
        "$(find_python)" -m venv "$VENV"
    fi
    echo "==> installing cyberun-agent[$extras] into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$extras]"
    echo "$want" >"$stamp"
}

#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: torch==2.13.0 (CPU build)
# first, so that the package's looser torch range never pulls a CUDA build, then the
# project itself in editable mode with its dev extras. Re-running is cheap: a stamp file
# holding the hash of pyproject.toml and this script skips the install when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}
stamp="$venv/.packrnn-stamp"
want=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
echo "packrnn: setting up $venv" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[dev]"
echo "$want" > "$stamp"

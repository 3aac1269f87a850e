#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: torch==2.13.0 (CPU build)
# first, so that the package's looser torch range never pulls a CUDA build, then the
# project itself in editable mode with its dev extras. Re-running is cheap: a stamp file
# holding the hash of pyproject.toml and the set-up scripts skips the install when nothing
# changed. Each step prints a line (stderr) as it starts, with the seconds spent so far.
#
# Where torch comes from (scripts/torch_source.py decides, nothing is downloaded to decide): a
# local torch 2.13.0 wheel pip already knows (find-links), else an index the machine's pip
# configuration names, else PyTorch's CPU index explicitly -- never PyPI's CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
python=${PYTHON:-python3}
torch_version=2.13.0
stamp="$venv/.packrnn-stamp"
want=$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" "$root/scripts/torch_source.py" \
       | sha256sum | cut -d' ' -f1)
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
start=$SECONDS
step() { echo "packrnn set-up [$1/4, $((SECONDS - start)) s]: $2" >&2; }
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

echo "packrnn: setting up $venv (about a minute with local wheels; a few on a fresh machine)" >&2
if [[ -x "$venv/bin/python" ]]; then
    step 1 "virtual environment $venv exists"
else
    step 1 "creating the virtual environment $venv"
    "$python" -m venv "$venv"
fi
step 2 "upgrading pip"
"${pip[@]}" --upgrade pip
if "$venv/bin/python" -c "import importlib.metadata as m, sys
sys.exit(m.version('torch').split('+')[0] != '$torch_version')" 2>/dev/null; then
    step 3 "torch $torch_version is already installed"
else
    decided=$("$venv/bin/python" "$root/scripts/torch_source.py" "$torch_version")
    mapfile -t source <<< "$decided"  # pip arguments, then "# why"
    step 3 "installing torch $torch_version from ${source[-1]#\# }"
    unset 'source[-1]'
    "${pip[@]}" ${source[@]+"${source[@]}"} "torch==$torch_version"
fi
step 4 "installing packrnn (editable) with its dev extras"
"${pip[@]}" -e "$root[dev]"
echo "$want" > "$stamp"
echo "packrnn: set-up done in $((SECONDS - start)) s" >&2

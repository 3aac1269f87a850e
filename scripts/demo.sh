#!/usr/bin/env bash
# Set up .venv if needed (scripts/bootstrap.sh), then run the main job: `packrnn demo`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/packrnn" demo "$@"

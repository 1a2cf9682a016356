#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up .venv, then run pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest -q "$@"

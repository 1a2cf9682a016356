#!/usr/bin/env bash
# Engine vs transformers benchmark, one process: bash scripts/bench.sh --preset mid --workload all --json out.json
# See docs/PERFORMANCE.md for presets, workloads and recorded figures.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${MODELTEST_PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m modeltest bench "$@"

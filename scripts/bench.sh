#!/usr/bin/env bash
# Engine vs transformers benchmark, one process: bash scripts/bench.sh --preset mid --workload all --json out.json
# See docs/PERFORMANCE.md for presets, workloads and recorded figures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec "$py" -m modeltest bench "$@"

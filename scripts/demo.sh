#!/usr/bin/env bash
# The offline demo, from a fresh clone: set up .venv, build a tiny random-weight Qwen2-VL with the
# real Qwen2 tokenizer plus small TextVQA- and VideoBench-format datasets (./demo_data), then run
#   bash scripts/mm_run.sh textvqa qwen2_vl ...   and   bash scripts/mm_run.sh videobench qwen2_vl ...
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup_env.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m modeltest demo --dir "$repo/demo_data" "$@"

#!/usr/bin/env bash
# Accuracy run: bash scripts/mm_run.sh TASK MODEL [key=value ...]
#   e.g. bash scripts/mm_run.sh textvqa qwen2_vl model.model_path=/w/Qwen2-VL-7B-Instruct batch_size=8
# Tasks: configs/task/*.yaml; models: configs/model/*.yaml. Any config key can be overridden.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $# -lt 2 ]]; then
    echo "usage: bash scripts/mm_run.sh TASK MODEL [key=value ...]" >&2
    echo "tasks : $(cd "$repo/configs/task" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    echo "models: $(cd "$repo/configs/model" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi
# The project's virtual environment if scripts/setup_env.sh made one, else the python on PATH.
py=${MODELTEST_PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
# Visible devices as in the reference: export ASCEND_RT_VISIBLE_DEVICES=0,1 (NPU) or
# CUDA_VISIBLE_DEVICES=0,1 (GPU) before calling this script.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m modeltest run "$@"

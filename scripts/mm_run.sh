#!/usr/bin/env bash
# Accuracy run: bash scripts/mm_run.sh TASK MODEL [key=value ...]
#   e.g. bash scripts/mm_run.sh textvqa qwen2_vl model.model_path=/w/Qwen2-VL-7B-Instruct batch_size=8
# Tasks: configs/task/*.yaml; models: configs/model/*.yaml. Any config key can be overridden.
#
# Devices: as in the reference, export ASCEND_RT_VISIBLE_DEVICES=0,1 (NPU) or
# CUDA_VISIBLE_DEVICES=0,1 (GPU) to choose the cards; with more than one visible card (or tp=N)
# the run is tensor parallel over N processes started by torchrun (engine backend).
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
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# Tensor-parallel size: tp=N on the command line, else the number of visible devices.
tp=""
for arg in "${@:3}"; do
    case $arg in tp=*|run.tp=*) tp=${arg#*=} ;; esac
done
if [[ -z $tp || $tp == null ]]; then
    visible=${ASCEND_RT_VISIBLE_DEVICES:-${CUDA_VISIBLE_DEVICES:-}}
    if [[ -n $visible ]]; then tp=$(awk -F, '{print NF}' <<<"$visible"); else tp=1; fi
fi
if ! [[ $tp =~ ^[0-9]+$ ]] || (( tp < 1 )); then
    echo "modeltest: error: tp=$tp is not a positive integer" >&2
    exit 2
fi
if (( tp == 1 )); then
    exec "$py" -m modeltest run "$@"
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-20030}
exec "$py" -m torch.distributed.run --nnodes 1 --nproc_per_node "$tp" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" -m modeltest run "$@"

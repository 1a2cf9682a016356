#!/usr/bin/env bash
# Accuracy run: bash scripts/mm_run.sh TASK MODEL [key=value ...]
#   e.g. bash scripts/mm_run.sh textvqa qwen2_vl model.model_path=/w/Qwen2-VL-7B-Instruct batch_size=8
# Tasks: configs/task/*.yaml; models: configs/model/*.yaml. Any config key can be overridden.
#
# Devices: as in the reference, export ASCEND_RT_VISIBLE_DEVICES=0,1 (NPU) or
# CUDA_VISIBLE_DEVICES=0,1 (GPU) to choose the cards. tp=N: devices per model replica (tensor
# parallel); dp=M: replicas splitting the samples (data parallel). `modeltest run` starts the
# dp x tp processes with torchrun (modeltest/launch.py); by default tp = visible devices / dp.
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT the same way on every node
# and run this script on each.
# Re-running the same command with the same output_dir resumes: finished samples are reused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [[ $# -lt 2 ]]; then
    echo "usage: bash scripts/mm_run.sh TASK MODEL [key=value ...]" >&2
    echo "tasks : $(cd "$repo/configs/task" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    echo "models: $(cd "$repo/configs/model" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi
exec "$py" -m modeltest run "$@"

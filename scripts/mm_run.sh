#!/usr/bin/env bash
# Accuracy run: bash scripts/mm_run.sh TASK MODEL [key=value ...]
#   e.g. bash scripts/mm_run.sh textvqa qwen2_vl model.model_path=/w/Qwen2-VL-7B-Instruct batch_size=8
# Tasks: configs/task/*.yaml; models: configs/model/*.yaml. Any config key can be overridden.
#
# Devices: as in the reference, export ASCEND_RT_VISIBLE_DEVICES=0,1 (NPU) or
# CUDA_VISIBLE_DEVICES=0,1 (GPU) to choose the cards. tp=N: devices per model replica (tensor
# parallel); dp=M: replicas splitting the samples (data parallel). dp x tp processes are started
# with torchrun; by default tp = visible devices / dp. Several nodes: set NNODES, NODE_RANK,
# MASTER_ADDR and MASTER_PORT the same way on every node and run this script on each.
# Re-running the same command with the same output_dir resumes: finished samples are reused.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [[ $# -lt 2 ]]; then
    echo "usage: bash scripts/mm_run.sh TASK MODEL [key=value ...]" >&2
    echo "tasks : $(cd "$repo/configs/task" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    echo "models: $(cd "$repo/configs/model" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
    exit 2
fi

tp=""; dp=""
for arg in "${@:3}"; do
    case $arg in
        tp=*|run.tp=*) tp=${arg#*=} ;;
        dp=*|run.dp=*) dp=${arg#*=} ;;
    esac
done
[[ -z $dp || $dp == null ]] && dp=1
nnodes=${NNODES:-1}
if [[ -z $tp || $tp == null ]]; then
    visible=${ASCEND_RT_VISIBLE_DEVICES:-${CUDA_VISIBLE_DEVICES:-}}
    if [[ -n $visible ]]; then
        devices=$(awk -F, '{print NF}' <<<"$visible")
        tp=$(( devices * nnodes / dp )); (( tp < 1 )) && tp=1
    else
        tp=1
    fi
fi
for v in "tp=$tp" "dp=$dp" "NNODES=$nnodes"; do
    if ! [[ ${v#*=} =~ ^[0-9]+$ ]] || (( ${v#*=} < 1 )); then
        echo "modeltest: error: $v is not a positive integer" >&2
        exit 2
    fi
done
procs=$(( tp * dp ))
if (( procs == 1 )); then
    exec "$py" -m modeltest run "$@"
fi
if (( procs % nnodes )); then
    echo "modeltest: error: dp x tp = $procs processes do not split over NNODES=$nnodes nodes" >&2
    exit 2
fi
# Check the configuration once, before torchrun starts processes that would each report it.
"$py" -m modeltest check "$@" "tp=$tp" "dp=$dp"
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-20030}
exec "$py" -m torch.distributed.run --nnodes "$nnodes" --node_rank "${NODE_RANK:-0}" \
    --nproc_per_node $(( procs / nnodes )) --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m modeltest run "$@" "dp=$dp" "tp=$tp"

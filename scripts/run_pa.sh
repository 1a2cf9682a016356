#!/usr/bin/env bash
# One image/video (or a folder of them) through the inference core, with performance figures.
#   bash scripts/run_pa.sh --model_path DIR --input_image FILE --input_text "..." \
#        --max_batch_size 1 --max_input_length 4096 --max_output_length 256
#   ATB_LLM_BENCHMARK_ENABLE=1 bash scripts/run_pa.sh ...   (prefill/decode figures + benchmark CSV)
# World size: --world_size N, else the number of devices in ASCEND_RT_VISIBLE_DEVICES /
# CUDA_VISIBLE_DEVICES, else 1. N > 1 runs `torchrun --nproc_per_node N -m modeltest.run_pa ...`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
world=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
        --world_size) world=${args[i+1]:-} ;;
        --world_size=*) world=${args[i]#*=} ;;
    esac
done
if [[ -z $world ]]; then
    visible=${ASCEND_RT_VISIBLE_DEVICES:-${CUDA_VISIBLE_DEVICES:-}}
    if [[ -n $visible ]]; then world=$(awk -F, '{print NF}' <<<"$visible"); else world=1; fi
fi
if (( world == 1 )); then
    exec "$py" -m modeltest.run_pa "$@"
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-20030}
exec "$py" -m torch.distributed.run --nnodes 1 --nproc_per_node "$world" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" -m modeltest.run_pa "$@"

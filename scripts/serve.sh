#!/usr/bin/env bash
# An OpenAI-compatible server on the inference core: bash scripts/serve.sh --model_path DIR [options]
#   bash scripts/serve.sh --model_path /data/Qwen2-VL-7B-Instruct --port 8000
#   CUDA_VISIBLE_DEVICES=0,1 bash scripts/serve.sh --model_path DIR      (tensor parallel over 2 GPUs)
#   ASCEND_RT_VISIBLE_DEVICES=0,1,2,3 bash scripts/serve.sh --model_path DIR --tp 4
# Several devices: `modeltest serve` starts --tp processes (default: the visible devices) under
# torchrun; rank 0 serves HTTP, every rank runs the same engine steps. Set MASTER_PORT when two
# servers share a machine. `modeltest serve --help` lists every option.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec "$py" -m modeltest serve "$@"

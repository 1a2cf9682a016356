#!/usr/bin/env bash
# A second environment, .venv-t5, that is .venv with transformers 5 on top: the packages
# installed here (transformers 5 and the tokenizers/huggingface_hub it needs) shadow .venv's,
# everything else (torch, qwen-vl-utils, decord, modeltest) comes from .venv. The test suite
# runs its transformers-facing tests in it, so the core, the hf backend and the benchmark keep
# working with both major versions. Needs scripts/setup_env.sh first.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${MODELTEST_VENV:-$repo/.venv}
venv=$repo/.venv-t5
version=5.24.0
if [[ ! -x $base/bin/python ]]; then
    echo "[setup-t5] error: no Python environment at $base; run bash scripts/setup_env.sh first" >&2
    exit 2
fi

if [[ ! -x $venv/bin/python ]]; then
    echo "[setup-t5] creating $venv on top of $base"
    "$base/bin/python" -m venv "$venv"
fi
py=$venv/bin/python
site_here=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site_base=$("$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a bare path line) so .venv's own .pth files (the editable modeltest) apply too.
echo "import site; site.addsitedir('$site_base')" > "$site_here/zz_modeltest_base.pth"
if ! "$py" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" >/dev/null 2>&1; then
    echo "[setup-t5] installing transformers==$version into $venv"
    # pip sees .venv's packages through the .pth: what they satisfy stays there, and the newer
    # huggingface_hub/tokenizers land here (pip leaves .venv's copies alone: outside this env).
    "$py" -m pip install --disable-pip-version-check -q "transformers==$version"
fi
"$py" -c "import torch, transformers, qwen_vl_utils, modeltest; print(f'[setup-t5] ready: torch {torch.__version__}, transformers {transformers.__version__}')"

#!/usr/bin/env bash
# Another environment that is .venv with another transformers on top: the packages installed
# here (that transformers and the tokenizers/huggingface_hub it needs) shadow .venv's, everything
# else (torch, qwen-vl-utils, decord, modeltest) comes from .venv. The test suite runs its
# transformers-facing tests in them, so the core, the hf backend and the benchmark keep working
# with each version users have.
#   bash scripts/setup_compat_env.sh          .venv-t5:   transformers 5.24.0
#   bash scripts/setup_compat_env.sh 4.57     .venv-t457: transformers 4.57.1, the last 4.x (the
#                                             first with Qwen2.5-VL is 4.49; .venv has 4.46.3)
#   bash scripts/setup_compat_env.sh 4.49     .venv-t449: transformers 4.49.0, the first with
#                                             Qwen2.5-VL
# Needs scripts/setup_env.sh first.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${MODELTEST_VENV:-$repo/.venv}
case ${1:-5} in
    5) venv=$repo/.venv-t5 version=5.24.0 ;;
    4.57) venv=$repo/.venv-t457 version=4.57.1 ;;
    4.49) venv=$repo/.venv-t449 version=4.49.0 ;;
    *) echo "[setup-compat] usage: bash scripts/setup_compat_env.sh [5|4.57|4.49]" >&2; exit 2 ;;
esac
if [[ ! -x $base/bin/python ]]; then
    echo "[setup-compat] error: no Python environment at $base; run bash scripts/setup_env.sh first" >&2
    exit 2
fi

if [[ ! -x $venv/bin/python ]]; then
    echo "[setup-compat] creating $venv on top of $base"
    "$base/bin/python" -m venv "$venv"
fi
py=$venv/bin/python
site_here=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site_base=$("$base/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir (not a bare path line) so .venv's own .pth files (the editable modeltest) apply too.
echo "import site; site.addsitedir('$site_base')" > "$site_here/zz_modeltest_base.pth"
if ! "$py" -c "import transformers, sys; sys.exit(transformers.__version__ != '$version')" >/dev/null 2>&1; then
    echo "[setup-compat] installing transformers==$version into $venv"
    # pip sees .venv's packages through the .pth: what they satisfy stays there, and the newer
    # huggingface_hub/tokenizers land here (pip leaves .venv's copies alone: outside this env).
    "$py" -m pip install --disable-pip-version-check -q "transformers==$version"
fi
"$py" -c "import torch, transformers, qwen_vl_utils, modeltest; print(f'[setup-compat] ready: torch {torch.__version__}, transformers {transformers.__version__}')"

# Sourced by the scripts here: picks the Python to run and puts the repository on PYTHONPATH.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The project's virtual environment if scripts/setup_env.sh made one, else the python on PATH.
py=${MODELTEST_PYTHON:-}
if [[ -z $py ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

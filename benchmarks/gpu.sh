#!/usr/bin/env bash
# Hearth on one NVIDIA GPU, without internet: the embedding model at batch sizes 1 to 256 and
# the demo image pipelines at 512x512 in the worker's dtype (bfloat16, or float16), optionally
# Hearth end to end (--service); one Markdown table, also written to $OUT/gpu-results.md when
# OUT is set. The measuring is done by benchmarks/gpu_bench.py; this script finds or sets up
# the Python that runs it.
#
# Usage: benchmarks/gpu.sh [WHEELS] [--quick] [--service] [other gpu_bench.py options]
#
#   PYTHON    an interpreter to use as it is (it must have torch with CUDA)
#   VENV      the virtual environment to find or create (default: .venv-gpu in the repository)
#   WHEELS    the wheelhouse to install from (default: benchmarks/wheels; the first argument wins)
#   OUT       when set, the table is also written to $OUT/gpu-results.md
#   BUDGET_S  seconds from start after which measurements are skipped (default 420)
#
# A new virtual environment sees the system's packages, so a torch with CUDA already installed
# on the machine is used as it is. What is missing is installed from the wheelhouse only
# (pip --no-index): torch first, then Hearth and its dependencies.
#
# Preparing the wheelhouse, on a machine with internet and the GPU machine's Python version
# and platform (Linux x86_64):
#   pip download --dest benchmarks/wheels torch==2.13.0 \
#       --index-url https://download.pytorch.org/whl/cu128
#   pip download --dest benchmarks/wheels --find-links benchmarks/wheels \
#       setuptools psutil .
# (psutil serves --service only.) For another Python or platform, add
# --python-version 3.X --platform manylinux_2_28_x86_64 --only-binary=:all: to both commands.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
wheels=${WHEELS:-$here/wheels}
if [[ $# -gt 0 && $1 != -* ]]; then
    wheels=$1
    shift
fi
venv=${VENV:-$repo/.venv-gpu}
budget=${BUDGET_S:-420}
service=0
for arg in "$@"; do
    if [[ $arg == --service ]]; then service=1; fi
done

export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# Hearth's packages import from the checkout itself, installed or not (the worker too).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cd "$repo"

wheelhouse_help() {
    local version
    version=$("$py" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?')
    cat >&2 <<EOF
Prepare the wheelhouse on a machine with internet, with Python $version on Linux x86_64
(or add --python-version, --platform manylinux_2_28_x86_64 and --only-binary=:all:):
  pip download --dest benchmarks/wheels torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
  pip download --dest benchmarks/wheels --find-links benchmarks/wheels setuptools psutil .
then bring benchmarks/wheels here (or pass its folder as the first argument, or WHEELS=...).
EOF
}

missing() {  # what is missing: the error, and how to fix it
    echo "error: $1" >&2
    wheelhouse_help
    exit 1
}

pip_install() {
    "$py" -m pip install --quiet --no-index --find-links "$wheels" "$@"
}

cuda_torch() {
    "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

bench_check() {  # every import a run needs, and the versions
    local flags=(--check)
    if [[ $service == 1 ]]; then flags+=(--service); fi
    "$py" benchmarks/gpu_bench.py "${flags[@]}"
}

# 1. The interpreter: $PYTHON, else the virtual environment, created when missing.
if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
elif [[ -e $venv/bin/python ]]; then
    py=$venv/bin/python
    if ! "$py" -c '' 2>/dev/null; then
        echo "error: $venv exists but its python does not run; remove it, or set VENV" >&2
        exit 1
    fi
else
    base=$(command -v python3 || true)
    if [[ -z $base ]]; then
        echo "error: no python3 to create $venv with; set PYTHON to an interpreter" >&2
        exit 1
    fi
    echo "creating $venv (with the system's packages) from $base"
    "$base" -m venv --system-site-packages "$venv"
    py=$venv/bin/python
fi
echo "python: $py ($("$py" -c 'import platform; print(platform.python_version())'))"

# 2. torch with CUDA, installed from the wheelhouse when the interpreter lacks it.
if cuda_torch; then
    echo "torch with CUDA: already there"
else
    if "$py" -c 'import torch' 2>/dev/null; then
        reason="torch $("$py" -c 'import torch; print(torch.__version__)') in $py sees no CUDA device"
    else
        reason="torch is not installed in $py"
    fi
    torch_wheel=""
    if [[ -d $wheels ]]; then
        torch_wheel=$(find "$wheels" -maxdepth 1 -name 'torch-*.whl' | sort -V | tail -n 1)
    fi
    if [[ -z $torch_wheel ]]; then
        missing "$reason, and $wheels holds no torch-*.whl to install"
    fi
    echo "$reason: installing $(basename "$torch_wheel")"
    pip_install "$torch_wheel"
    if ! cuda_torch; then
        echo "error: torch from $torch_wheel sees no CUDA device either (a CPU build? no driver?)" >&2
        nvidia-smi >&2 || true
        exit 1
    fi
fi

# 3. Hearth's dependencies (and psutil for --service), from the wheelhouse.
if ! bench_check >/dev/null 2>&1; then
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        bench_check >&2 || true
        missing "Hearth's dependencies are not all importable by $py, and $wheels holds no wheels"
    fi
    echo "installing Hearth and its dependencies from $wheels"
    if ! "$py" -c 'import setuptools' 2>/dev/null; then pip_install setuptools; fi
    pip_install --no-build-isolation -e "$repo"
    if [[ $service == 1 ]]; then pip_install psutil; fi
    if ! bench_check >/dev/null 2>&1; then
        bench_check >&2 || true
        missing "still not importable after installing from $wheels (see above)"
    fi
fi

# 4. What runs: the GPUs and the versions.
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    echo "nvidia-smi: not found"
fi
bench_check 2>/dev/null

# 5. The measurements, within what is left of the time budget (options given later win).
left=$((budget - SECONDS))
if ((left < 60)); then left=60; fi
exec "$py" benchmarks/gpu_bench.py --budget "$left" "$@"

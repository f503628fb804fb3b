#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build the fused CUDA kernels, run their GPU tests,
# time them against copy bandwidth and the torch references, and run the hook tests on a machine
# with CUDA. Logs and JSON go to $OUT (default benchmarks/results/gpu); each part has a time limit
# and a failure does not stop the next part.
#
#     bash benchmarks/gpu_session.sh            # or: OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $((SECONDS - start))s; last lines:"
    tail -n 5 "$out/$name.log" | sed 's/^/   /'
}

part machine 60 bash -c 'nvidia-smi; nvcc --version; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"'
part build 600 python -c "from ddp_hooks import kernels; print(kernels.status())"
part kernel_tests 600 python -m pytest -q -rs tests/test_kernels.py
part kernel_bench 900 python benchmarks/kernels.py --out "$out"
part cpu_codec 300 python benchmarks/cpu_codec.py --models resnet50 --out "$out"
part hook_tests 900 python -m pytest -q -x -n 4 tests
echo "results in $out"

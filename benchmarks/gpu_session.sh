#!/usr/bin/env bash
# Everything that needs a GPU, in one command of at most 8 minutes on one GPU:
#   1. build     the fused CUDA kernels (each checked against its torch reference at load)
#   2. kernels   their GPU tests (bit equality with the torch references)
#   3. bench     the kernel benchmark at 2^24 and 1e8 elements, as ratios to copy bandwidth
#   4. syncs     every hook's code paths in a one-rank NCCL DDP run under
#                torch.cuda.set_sync_debug_mode("error")
#   5. codecs    each hook's step time on ResNet-50 and GPT (one GPU: step - compute = codec)
#                beside torch's bf16_compress_hook and powerSGD_hook, then our PowerSGD
#                against torch's on the same shapes
# Each part has its own time limit (and all together stop by 7.5 minutes); a failure does not
# stop the next part. Results (at most 6 files): session.log and the JSON of parts 3-5 in $OUT
# (default benchmarks/results/gpu).
#
#     bash benchmarks/gpu_session.sh            # or: OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
log="$out/session.log"
: > "$log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}"
deadline=$((SECONDS + 450))

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: skipped, the session's 7.5 minutes are used" | tee -a "$log"
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
}

part machine 20 bash -c 'nvidia-smi; nvcc --version; python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"'
part build 180 python -c "from ddp_hooks import kernels; print(kernels.status())"
part kernels 60 python -m pytest -q -rs -p no:cacheprovider -k "not compile" tests/test_kernels.py
part bench 100 python benchmarks/kernels.py --out "$out"
part syncs 60 python benchmarks/sync_check.py --out "$out"
for model in resnet50 gpt; do
    part "codecs-$model" 60 python benchmarks/step_time.py --models "$model" --workers 1 --steps 10 \
        --name "step_time_1gpu_$model" --out "$out"
done
part powersgd 45 python benchmarks/powersgd.py --models resnet50,gpt --workers 1 --out "$out"
echo "results in $out ($((SECONDS))s)" | tee -a "$log"

#!/usr/bin/env bash
# The GPU's share of the checks and benchmarks, prepared for a lent GPU machine: one command, under 10 minutes.
#
#   device run:  command "bash benchmarks/gpu.sh", timeout_s 590
#
# It uses that machine's own python3 (PyTorch with CUDA; nothing can be installed there) with this checkout's src/ on
# PYTHONPATH. First benchmarks/gpu_check.py (the tiny preset on CUDA against the CPU, fast against reference, cached
# decoding against one call, gradients, the compiled decoding step as CUDA graphs against the eager one): a failure
# stops everything. Then `run_all.py --gpu` (GPU_PLAN: prefill at 4K, 32K and 131K against dense, decode at 131K,
# training, the compiled decoding step at 131K). What it wrote lands in $OUT; back here, copy
# gpu-*.jsonl into benchmarks/results/ and run `python benchmarks/run_all.py --docs`.
set -uo pipefail
OUT=${OUT:-/tmp/dsv4-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! timeout 240 python3 benchmarks/gpu_check.py | tee "$OUT/gpu_check.json"; then
    echo "gpu_check failed: no benchmarks" >&2
    exit 1
fi
timeout 330 python3 benchmarks/run_all.py --gpu 2>&1 | tee "$OUT/run_all.log"
echo "run_all exit: $?"
cp benchmarks/results/gpu-*.jsonl "$OUT/" 2>/dev/null || echo "no GPU results were written" >&2

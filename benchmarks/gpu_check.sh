#!/usr/bin/env bash
# The checks that need a GPU, in one go: the CUDA cases of the tests, then the GPU timings.
#   bash benchmarks/gpu_check.sh [OUTDIR]       (needs dimscope's dependencies and a CUDA build of torch)
# Writes devices.log, overhead_cuda.txt and jacobian_cuda.txt to OUTDIR (default .); with GPU_CHECK_SUITE=1 also
# suite.log, the whole suite on that machine's Python and torch. About 3 minutes without the suite on an H200.
set -uo pipefail
out="${1:-.}"
status=0
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
echo "== CUDA cases of the tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_devices.py 2>&1 | tee "$out/devices.log" || status=1
echo "== training overhead on the GPU"
timeout 200 python3 benchmarks/overhead.py --device cuda --steps 1000 --repeats 3 2>&1 | tee "$out/overhead_cuda.txt" || status=1
echo "== dense training Jacobian of the paper's setup on the GPU"
timeout 120 python3 benchmarks/jacobian.py --device cuda --chunk 1024 --generic --generic-columns 64 2>&1 | tee "$out/jacobian_cuda.txt" || status=1
if [ "${GPU_CHECK_SUITE:-0}" = 1 ]; then  # the whole suite on that machine's Python and torch: over 150 s with 8 workers
    echo "== the rest of the suite on this machine's Python and torch (CPU paths)"
    timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 -rf tests 2>&1 | tee "$out/suite.log" || status=1
fi
exit "$status"  # non-zero when any step failed or ran out of time

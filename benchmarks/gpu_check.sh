#!/usr/bin/env bash
# GPU check: aekt check and the kernel benchmark (benchmarks/kernel.py) on CUDA, float32 with the off-path
# rows (torch.compile, dense, peak memory by max_memory_allocated; CUDA events). Run from the repo root of
# a working-tree copy on a GPU machine; results go to $OUT (named by the GPU). Under 2000 characters, so it
# can be pasted as one device command. Needs a Python with torch+CUDA there; the package itself is pure
# Python (PYTHONPATH=.).
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=""; for c in "${PY_BIN:-}" .venv/bin/python python3 python; do
  [ -n "$c" ] && "$c" -c 'import torch;assert torch.cuda.is_available()' 2>/dev/null && { PY=$c; break; }; done
[ -z "$PY" ] && { echo "no python with torch+CUDA found" | tee "$OUT/error.txt"; exit 3; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
G=$($PY -c 'import re,torch;print(re.sub("[^a-z0-9]+","-",torch.cuda.get_device_name(0).lower()).strip("-"))')
$PY -c 'import torch,sys;print(sys.version,torch.__version__,torch.version.cuda,torch.cuda.get_device_name(0))' > "$OUT/env_$G.txt"
rc=0
timeout 120 $PY -m aekt_plugin check --device cuda > "$OUT/check_cuda_$G.txt" 2>&1 || rc=1
tail -5 "$OUT/check_cuda_$G.txt"
for dt in float32 bfloat16 float16; do  # float32 adds the off-path rows: compiled, dense, peak memory
  X="--offpath none --no-e2e"; [ $dt = float32 ] && X="--offpath-rounds 11"
  timeout 420 $PY benchmarks/kernel.py --device cuda --dtype $dt --threads 1 --quiet $X \
    --shapes 64x100,256x100,512x1000,1024x1000,8192x1000 \
    --json "$OUT/kernel_cuda_${G}_$dt.json" --markdown "$OUT/kernel_cuda_${G}_$dt.md" 2> "$OUT/bench_$dt.err" || rc=1
  grep -E "overall|FAIL|^\| (time|compiled|eager|extra)" "$OUT/kernel_cuda_${G}_$dt.md" 2>/dev/null | head -24
done
echo "gpu_check rc=$rc; files in $OUT"; exit $rc

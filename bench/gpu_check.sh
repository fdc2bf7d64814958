#!/usr/bin/env bash
# CUDA checks and GPU timings, from the repository root on a CUDA machine. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)" \
    | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_crop.py tests/test_tracker.py tests/test_model.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -4
python3 bench/sync_check.py 2>&1 | tee "$OUT/sync.txt"
for dtype in float32 float16 bfloat16; do
    python3 -m lorat.bench configs/b224.yaml --device cuda --dtype $dtype --frames 300 --iters 200 > "$OUT/b224_$dtype.json"
done
python3 -m lorat.bench configs/l224.yaml --device cuda --dtype float16 --frames 300 --iters 200 > "$OUT/l224_float16.json"
python3 -m lorat.bench configs/b224.yaml --device cuda --dtype float16 --compile --frames 300 --iters 200 \
    > "$OUT/b224_float16_compile.json" 2> "$OUT/compile.err"
for f in "$OUT"/*.json; do echo "== $f"; python3 -c "import json,sys; d=json.load(open('$f')); print({k: d[k] for k in ('model_fps','tracking_fps','split_ms','peak_memory_mb')})"; done

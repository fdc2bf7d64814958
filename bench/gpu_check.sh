#!/usr/bin/env bash
# CUDA checks and GPU timings, run from the repository root; results go to $OUT (default gpu_out/),
# to be committed under bench/results/. Sized to finish well inside 10 minutes on one H100.
# On a machine without CUDA it is a dry run: it says so and exits 0 without measuring anything.
set -uo pipefail
OUT=${OUT:-gpu_out}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu_check.sh needs CUDA (torch.cuda.is_available() is False here): dry run, nothing measured"
    exit 0
fi
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'peft', peft.__version__)" \
    | tee -a "$OUT/gpu.txt"
# 1. the CUDA paths of the tests (GPU crops, GPU tracking == CPU tracking), and host syncs per frame
python3 -m pytest -q -p no:cacheprovider tests/test_crop.py tests/test_tracker.py tests/test_model.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -4
python3 bench/sync_check.py 2>&1 | tee "$OUT/sync.txt"
# 2. every dtype and torch.compile, model-only and end to end, peak memory, outputs vs float32
for config in b224 l378; do
    python3 -m lorat.bench configs/$config.yaml --device cuda --frames 300 --iters 200 --table \
        2> "$OUT/${config}_table.err" | tee "$OUT/${config}_table.md"
done
# 3. batched evaluation throughput: the same sequences one at a time and 16 per forward pass
python3 -m lorat.data.synthetic "$OUT/data" --sequences 32 --frames 100 --seed 5 > /dev/null
python3 - "$OUT" <<'PY'
import json, sys, time, torch
from pathlib import Path
from lorat.build import build_lorat
from lorat.checkpoint import save_model
from lorat.config import load_config
out = Path(sys.argv[1])
config = load_config("configs/b224.yaml")
torch.manual_seed(0)
save_model(build_lorat(config.model, lora=False).eval(), config, out / "b224_random.safetensors")
PY
for batch in 1 16; do
    start=$(date +%s.%N)
    python3 -m lorat.evaluate --weights "$OUT/b224_random.safetensors" --dataset "lasot=$OUT/data" \
        --output "$OUT/eval_batch$batch" --device cuda --batch $batch > "$OUT/eval_batch$batch.txt" 2>&1
    end=$(date +%s.%N)
    python3 -c "print('evaluate --batch $batch: 3200 frames in', round($end - $start, 1), 's,', round(3200 / ($end - $start), 1), 'frames/s (process start and model load included)')" \
        | tee -a "$OUT/eval_throughput.txt"
done
rm -rf "$OUT/data" "$OUT"/eval_batch*/ "$OUT/b224_random.safetensors"
echo "done: $OUT"

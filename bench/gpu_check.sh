#!/usr/bin/env bash
# CUDA checks and GPU timings, run from the repository root. Writes $OUT/gpu_check.md (the report,
# to be committed under bench/results/) and $OUT/gpu_check.log (everything else); OUT defaults to
# gpu_out/. Sized to finish inside 8 minutes on one H100; each step has its own time limit, and
# the report is written as the steps finish, so a cut-off run still leaves what it measured.
# On a machine without CUDA it is a dry run: it says so and exits 0 without measuring anything.
set -uo pipefail
OUT=${OUT:-gpu_out}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu_check.sh needs CUDA (torch.cuda.is_available() is False here): dry run, nothing measured"
    exit 0
fi
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md" LOG="$OUT/gpu_check.log"
: > "$LOG"
section() { printf '\n## %s\n\n' "$1" | tee -a "$REPORT"; }
fenced() { echo '```' >> "$REPORT"; tee -a "$REPORT"; echo '```' >> "$REPORT"; }
echo "# bench/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC')" | tee "$REPORT"

section "Machine"
{ nvidia-smi -L
  python3 -c "import torch, timm, peft; print('torch', torch.__version__, '| timm', timm.__version__, '| peft', peft.__version__)"
} 2>&1 | fenced

section "CUDA tests (pytest -m gpu: GPU crops, GPU == CPU trajectory, CUDA graph == eager, pinned upload)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_crop.py tests/test_tracker.py tests/test_transfer.py \
    >> "$LOG" 2>&1
echo "pytest exit status $?; the summary line:" | fenced
grep -E "passed|failed|error" "$LOG" | tail -1 | fenced

section "Host synchronisations per frame (float16, eager and CUDA graph)"
timeout 120 python3 bench/sync_check.py 2>> "$LOG" | fenced

# Every dtype, torch.compile and the CUDA graph: model only and end to end, peak memory, outputs vs float32.
for config in b224 l378; do
    section "${config}: python -m lorat.bench configs/${config}.yaml --device cuda --frames 200 --iters 100 --table"
    timeout 200 python3 -m lorat.bench configs/$config.yaml --device cuda --frames 200 --iters 100 --table \
        2>> "$LOG" | tee -a "$REPORT"
    if [ "$config" = b224 ]; then
        section "Batched evaluation throughput, b224 float16 (bench/eval_throughput.py, 32 generated sequences x 100 frames)"
        python3 -m lorat.data.synthetic "$OUT/data" --sequences 32 --frames 100 --seed 5 >> "$LOG" 2>&1
        timeout 150 python3 bench/eval_throughput.py configs/b224.yaml --dataset "lasot=$OUT/data" --batch 1 4 16 \
            --device cuda 2>> "$LOG" | tee -a "$REPORT"
        rm -rf "$OUT/data"
    fi
done
echo "done: $REPORT"

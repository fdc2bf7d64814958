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
# Training: our default step (float16 autocast on CUDA) with torch.compile, side by side with the official
# code's step at its GPU recipe (float16 + grad scaler, compile) when OFFICIAL=<checkout of LitingLin/LoRAT>
# is given; then memory of the largest model with and without activation checkpointing.
for config in b224 l224; do
    section "${config} training step, batch 32: python -m lorat.bench ${config} --train --table (each precision, compile, checkpointing)"
    timeout 400 python3 -m lorat.bench $config --train --batch 32 --steps 10 --device cuda --table 2>> "$LOG" \
        | tee -a "$REPORT"
    if [ -n "${OFFICIAL:-}" ]; then
        section "${config} training step, batch 32, ours vs the official code (float16, compile, alternating)"
        timeout 400 python3 bench/official_train_step.py --official "$OFFICIAL" --config $config --batch 32 \
            --steps 10 --rounds 2 --device cuda --official-amp float16 --official-compile --ours-args "--compile" \
            2>> "$LOG" | tee -a "$REPORT"
    fi
done
section "g378 training memory at batch 16 (the paper: 25.8 GB), without and with activation checkpointing"
for extra in "" "--grad-checkpointing"; do
    timeout 300 python3 -m lorat.bench g378 --train --batch 16 --steps 3 --device cuda $extra 2>> "$LOG" | tail -1 \
        | fenced
done
echo "done: $REPORT"

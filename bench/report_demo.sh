#!/usr/bin/env bash
# Score a model on the development clip, the held-out generated clips and the real reporting clips,
# next to OpenCV MIL and a never-moving box (README "Results"; issue 12's figures).
# Run from the repository root:
#   bash bench/report_demo.sh WEIGHTS OUT_DIR [CLIPS_DIR] [CUT_VAL_DIR]
# CLIPS_DIR: made by `bash bench/fetch_clips.sh data/clips`; CUT_VAL_DIR: data/cut-val of
# weights/train_demo.sh. One JSON per set goes to OUT_DIR; a missing set is skipped with a note.
set -euo pipefail
weights=$1
out=$2
clips=${3:-data/clips}
cut_val=${4:-data/cut-val}
mkdir -p "$out"
run() { python bench/compare.py --weights "$weights" --device cpu --mil --json "$@"; }
run --video assets/box.mp4 --gt assets/box_pseudo_gt.txt > "$out/box.json"
if [ -d "$cut_val" ]; then
    run --dataset "lasot=$cut_val" > "$out/cut-val.json"
else
    echo "note: $cut_val not found, held-out generated clips skipped" >&2
fi
for clip in cup carphone cube pedestrian; do
    if [ -f "$clips/$clip.mp4" ]; then
        run --video "$clips/$clip.mp4" --gt "bench/clips/${clip}_gt.txt" > "$out/$clip.json"
    else
        echo "note: $clips/$clip.mp4 not found (bash bench/fetch_clips.sh $clips), skipped" >&2
    fi
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| set | LoRAT | OpenCV MIL | never-moving box | bar: max(static + 0.10, 0.85 x MIL) |")
print("|---|---|---|---|---|")
for path in sorted(out.glob("*.json")):
    r = {k: v["success_auc"] for k, v in json.loads(path.read_text()).items()}
    bar = max(r["static"] + 0.10, 0.85 * r["mil"])
    verdict = "met" if r["lorat"] >= bar else "missed"
    print(f"| {path.stem} | {r['lorat']:.3f} | {r['mil']:.3f} | {r['static']:.3f} | {bar:.3f}: {verdict} |")
PY

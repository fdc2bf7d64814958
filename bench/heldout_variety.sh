#!/usr/bin/env bash
# The held-out generated set for the bundled model's weak points (wide / tall targets, greyscale,
# low light, a small salient part, strong rotation, perspective tilt, low detail), one subset per
# property, and the scores of a model on each next to OpenCV MIL and a never-moving box. Fixed
# before any training on such data: held-out cut-outs (--use heldout) over held-out photographs,
# seeds 7001-7008 (training uses others).
# Run from the repository root:
#   bash bench/heldout_variety.sh WEIGHTS OUT_DIR [DATA_DIR]
# DATA_DIR holds stamps/ and photos-heldout/ as weights/train_demo.sh makes them (default: data).
# SUBSETS="tilt lowres" bash bench/heldout_variety.sh ... scores only those subsets.
# The selection set (for choosing between candidates before the report; never reported) is the same
# recipe with other seeds and fewer clips: SEED_BASE=8000 CLIPS=6 SETS=data/selection-variety.
# MIL=0 leaves OpenCV MIL out (its column then reads nan).
set -euo pipefail
weights=$1
out=$2
data=${3:-data}
stamps="$data/stamps/usr/share/tuxpaint/stamps"
sets=${SETS:-$data/heldout-variety}
seed_base=${SEED_BASE:-7000}
clips=${CLIPS:-12}
mkdir -p "$out"
make() {  # NAME SEED OPTIONS...: $clips clips of 50 frames (seed_base + SEED), written once
    local name=$1 seed=$2
    shift 2
    [ -d "$sets/$name" ] || python -m lorat.data.cutouts "$sets/$name" --stamps "$stamps" \
        --photos "$data/photos-heldout" --use heldout --sequences "$clips" --frames 50 --seed $((seed_base + seed)) \
        --category "$name" "$@"
}
make wide 1 --aspect 3,8
make tall 2 --aspect 0.12,0.33
make grey 3 --grey 1
make dark 4 --dark 1
make salient 5 --salient 1
make spin 6 --spin 90
make tilt 7 --tilt 60
make lowres 8 --lowres 1
subsets=${SUBSETS:-wide tall grey dark salient spin tilt lowres}
for name in $subsets; do
    python bench/compare.py --weights "$weights" --device cpu $([ "${MIL:-1}" = 0 ] || echo --mil) --json \
        --dataset "lasot=$sets/$name" > "$out/$name.json"
done
python - "$out" $subsets <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("| held-out subset | LoRAT | OpenCV MIL | never-moving box |")
print("|---|---|---|---|")
for name in sys.argv[2:]:
    r = {k: v["success_auc"] for k, v in json.loads((out / f"{name}.json").read_text()).items()}
    print(f"| {name} | {r['lorat']:.3f} | {r.get('mil', float('nan')):.3f} | {r['static']:.3f} |")
PY

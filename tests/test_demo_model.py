"""The bundled demo model and clip: the quick start works offline and follows the object."""

import itertools
import os
import subprocess
import sys

import numpy as np
import torch
from torchvision.ops import box_iou

from lorat.checkpoint.loader import load_model
from lorat.data.sequences import read_boxes
from lorat.runtime import DEFAULT_WEIGHTS
from lorat.tracking.boxes import xywh_to_xyxy
from lorat.tracking.tracker import Tracker
from lorat.video import open_source

from .conftest import ROOT

CLIP = ROOT / "assets" / "box.mp4"
GT = ROOT / "assets" / "box_pseudo_gt.txt"


def test_bundled_model_is_small_and_self_describing():
    assert DEFAULT_WEIGHTS.is_file(), "weights/lorat_demo.safetensors must ship with the repository"
    assert DEFAULT_WEIGHTS.stat().st_size < 50 * 2**20
    model, config = load_model(DEFAULT_WEIGHTS)
    assert config.model.variant == "demo" and config.model.backbone.stem == "mobilenetv2"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_bundled_model_follows_the_box_on_the_bundled_clip():
    """Frames 334-363 of the bundled clip, where the box moves most: a box that never moves gets a
    mean IoU of 0.65 there against the pseudo ground truth; the demo model must do clearly better."""
    gt = read_boxes(GT)
    start, n = 333, 30
    source = open_source(str(CLIP))
    try:
        frames = [frame for index, frame in itertools.takewhile(lambda f: f[0] < start + n, source) if index >= start]
    finally:
        source.close()
    tracker = Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu")
    boxes = [r.targets[0].box for r in tracker.stream(frames, gt[start])]
    ious = box_iou(xywh_to_xyxy(torch.tensor(np.array(boxes))),
                   xywh_to_xyxy(torch.tensor(gt[start:start + n]))).diagonal().numpy()
    assert ious.mean() > 0.75, ious.round(2)  # pseudo ground truth: IoU > 0.5 is meaningful, fine decimals are not


def test_quick_start_command_uses_the_bundled_model(tmp_path):
    out = tmp_path / "box.txt"
    run = subprocess.run(
        [sys.executable, "-m", "lorat.track", str(CLIP), "--init", "290,14,308,228", "--max-frames", "5",
         "--save-txt", str(out), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "LORAT_WEIGHTS"})
    assert run.returncode == 0, run.stderr
    assert "using the bundled demo model" in run.stdout
    assert len(out.read_text().splitlines()) == 5

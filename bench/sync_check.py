"""Count host-device synchronisations per tracked frame on CUDA (expect 1: the box copy), eager and
with the step replayed as a CUDA graph (``cuda_graph=True``); float16 autocast."""

import glob
import warnings

import cv2
import torch

from lorat import load_config
from lorat.tracking.tracker import Tracker

TINY = "tests/fixtures/official-tiny/"
frames = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in sorted(glob.glob(TINY + "sequence/*.png"))]
for graph in (False, True):
    tracker = Tracker.from_pretrained(TINY + "lorat_trainable.safetensors", load_config(TINY + "config.yaml"),
                                      TINY + "dinov2_backbone.pth", device="cuda", dtype="float16", cuda_graph=graph)
    tracker.init(frames[0], (76, 77, 40, 38))
    tracker.track(frames[1])  # warm-up (and the graph's capture)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for frame in frames[2:]:
            tracker.track(frame)
    torch.cuda.set_sync_debug_mode(0)
    print(f"{'CUDA graph' if graph else 'eager'}: synchronisations per frame: {len(caught) / (len(frames) - 2):.2f}")
    for w in caught[:3]:
        print("  e.g.", str(w.message).splitlines()[0])

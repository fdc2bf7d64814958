"""``python -m lorat.vot`` and the VOT toolkit: regions in and out, masks from boxes (filled or SAM),
the toolkit's own ``vot test``, an offline workspace through ``vot evaluate`` / ``vot analysis``,
and the errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lorat.checkpoint.sam import (
    SamArchitecture,
    build_sam,
    load_sam,
    official_variants,
    sam_architecture,
    sam_from_state,
    sam_shapes,
)
from lorat.errors import LoratError, WeightsError
from lorat.evaluation.results import rasterize_xywh
from lorat.runtime import DEFAULT_WEIGHTS
from lorat.tracking.tracker import Tracker
from lorat.vot.masks import SamMasker, filled_boxes
from lorat.vot.server import trackers_ini
from lorat.vot.session import Start, VotSession, start_from_mask, start_from_points
from lorat.vot.workspace import write_sequence, write_workspace

from .helpers import textured_clip

TINY_SAM = SamArchitecture(width=32, depth=2, heads=2, global_blocks=(1,), window=4, patch=16, image_size=256,
                           mlp_ratio=2.0, prompt_dim=32, decoder_mlp=64)


def _toolkit():
    """The VOT toolkit, or a skip that says why (it is in the dev extra: pip install -e '.[dev]')."""
    try:
        import trax  # noqa: F401
        import vot.tracker  # noqa: F401
    except Exception as err:  # ImportError, or attributee's TypeError on a bad version pair
        pytest.skip(f"the VOT toolkit cannot be imported here ({type(err).__name__}: {err}); "
                    f"pip install 'lorat[vot]'")
    return vot


@pytest.fixture(scope="module")
def demo() -> Tracker:
    return Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> Path:
    pytest.importorskip("segment_anything", reason="pip install 'lorat[sam]'")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(build_sam(TINY_SAM).state_dict(), path)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- regions in


def test_mask_start_is_its_bounding_box_placed_at_its_offset_and_clipped():
    mask = np.zeros((5, 6), dtype=np.uint8)
    mask[1:4, 2:5] = 1  # pixels (x 2..4, y 1..3) of the crop
    start = start_from_mask(mask, (10, 20), (40, 50), 0)
    assert start.box == (12.0, 21.0, 3.0, 3.0)
    assert start.mask.shape == (40, 50) and start.mask.sum() == 9 and start.mask[21:24, 12:15].all()
    clipped = start_from_mask(np.ones((10, 10)), (-4, 35), (40, 50), 0)  # half outside, left and bottom
    assert clipped.box == (0.0, 35.0, 6.0, 5.0) and clipped.mask.sum() == 30


def test_empty_mask_and_flat_polygon_are_refused_by_name():
    with pytest.raises(LoratError, match="object 2: the initial mask is empty"):
        start_from_mask(np.zeros((4, 4)), (0, 0), (10, 10), 1)
    with pytest.raises(LoratError, match="object 1: the initial mask is empty"):
        start_from_mask(np.ones((4, 4)), (20, 20), (10, 10), 0)  # all of it outside the frame
    assert start_from_points([(1, 2), (5, 1), (4, 7)], 0).box == (1.0, 1.0, 4.0, 6.0)
    with pytest.raises(LoratError, match="object 3: the initial region .* has no area"):
        start_from_points([(1, 2), (5, 2), (3, 2)], 2)


# ----------------------------------------------------------------------------- the session


def test_boxes_are_the_tracker_api_boxes_with_the_official_rounding(demo):
    frames, boxes = textured_clip(8)
    session = VotSession(demo, filled_boxes, "auto")
    first = session.initialize(frames[0], [Start(tuple(map(float, boxes[0])))])
    assert first[0].box == tuple(map(float, boxes[0])) and first[0].mask is None and first[0].score == 1.0
    answers = [session.frame(f)[0] for f in frames[1:]]

    reference = Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu", dtype="float32")
    reference.init(frames[0], boxes[0])
    expected = [reference.track(f) for f in frames[1:]]
    np.testing.assert_array_equal([a.box for a in answers], rasterize_xywh(np.array([r.box for r in expected])))
    assert [a.score for a in answers] == [r.score for r in expected]
    assert all(float(v).is_integer() for a in answers for v in a.box)


def test_masks_where_asked_and_objects_that_start_later(demo):
    """auto: the object given as a mask answers masks (its box filled), the other rectangles; an object
    added on frame 3 is tracked as if it had been started alone there (no assignment)."""
    frames, boxes = textured_clip(7)
    demo.assignment = False
    try:
        mask = np.zeros(frames[0].shape[:2], dtype=bool)
        x, y, w, h = boxes[0]
        mask[y:y + h, x:x + w] = True
        session = VotSession(demo, filled_boxes, "auto")
        first = session.initialize(frames[0], [Start((float(x), float(y), float(w), float(h)), mask),
                                               Start((200.0, 30.0, 40.0, 50.0))])
        assert first[0].mask is mask and first[1].mask is None
        later = []
        for k, frame in enumerate(frames[1:], start=1):
            answers = session.frame(frame, [Start((150.0, 150.0, 60.0, 40.0))] if k == 3 else [])
            assert len(answers) == (3 if k >= 3 else 2)
            box_xyxy = np.array(answers[0].box) + [0, 0, *answers[0].box[:2]]
            assert answers[0].mask.shape == frame.shape[:2]
            np.testing.assert_array_equal(answers[0].mask, filled_boxes(frame, box_xyxy[None])[0])
            assert answers[1].mask is None
            if k > 3:
                later.append(answers[2])
        alone = Tracker.from_pretrained(DEFAULT_WEIGHTS, device="cpu", dtype="float32")
        alone.init(frames[3], (150.0, 150.0, 60.0, 40.0))
        expected = rasterize_xywh(np.array([alone.track(f).box for f in frames[4:]]))
        np.testing.assert_array_equal([a.box for a in later], expected)
    finally:
        demo.assignment = True


def test_output_mask_box_and_unreadable_frames(demo):
    frames, boxes = textured_clip(3)
    start = Start(tuple(map(float, boxes[0])))
    masks = VotSession(demo, filled_boxes, "mask")
    assert masks.initialize(frames[0], [start])[0].mask.sum() == boxes[0][2] * boxes[0][3]
    tracked = masks.frame(frames[1])
    again = masks.frame(None)  # unreadable: the last regions again, confidence 0
    assert again[0].box == tracked[0].box and again[0].mask is tracked[0].mask and again[0].score == 0.0
    boxes_only = VotSession(demo, filled_boxes, "box")
    given = np.zeros(frames[0].shape[:2], dtype=bool)
    given[10:20, 10:30] = True
    assert boxes_only.initialize(frames[0], [Start((10.0, 10.0, 20.0, 10.0), given)])[0].mask is None
    with pytest.raises(LoratError, match="unknown output"):
        VotSession(demo, filled_boxes, "polygon")


# ----------------------------------------------------------------------------- SAM


@pytest.mark.parametrize(("variant", "heads", "global_blocks"), [("vit_b", 12, (2, 5, 8, 11)),
                                                                  ("vit_l", 16, (5, 11, 17, 23)),
                                                                  ("vit_h", 16, (7, 15, 23, 31))])
def test_official_sam_variants_are_recognised_and_built_by_segment_anything(variant, heads, global_blocks,
                                                                            monkeypatch):
    """segment-anything's own builders (on the meta device: shapes only) against what we read; the
    variants are built by those builders, not from constants of ours."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        official = sam_model_registry[variant]().state_dict()
    arch = sam_architecture(official)
    assert (arch.name, arch.official, arch.heads, arch.global_blocks, arch.window, arch.image_size) == \
        (variant, variant, heads, global_blocks, 14, 1024)
    assert official_variants()[variant][0] == arch
    assert sam_shapes(arch) == {k: v.shape for k, v in official.items()}
    calls = []
    builder = sam_model_registry[variant]
    monkeypatch.setitem(sam_model_registry, variant, lambda *a, **k: calls.append(variant) or builder(*a, **k))
    with torch.device("meta"):
        build_sam(arch)
    assert calls == [variant]


def test_official_sam_takes_the_file_tensors_without_a_copy():
    """A ViT-B state dict (uninitialised memory, never touched) is checked, then becomes the model's."""
    state = {k: torch.empty(shape) for k, shape in official_variants()["vit_b"][1].items()}
    sam = sam_from_state(state, "sam_vit_b.pth")
    assert SamMasker(sam).name == "vit_b" and not any(p.is_meta for p in sam.parameters())
    qkv = "image_encoder.blocks.0.attn.qkv.weight"
    assert sam.state_dict()[qkv].data_ptr() == state[qkv].data_ptr()
    assert sam.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])


def test_sam_variant_is_read_from_the_file(tiny_sam, tmp_path):
    state = torch.load(tiny_sam, weights_only=True)
    assert sam_architecture(state) == TINY_SAM and TINY_SAM.official is None
    sam = load_sam(tiny_sam)
    assert SamMasker(sam).name == "ViT width 32, depth 2"
    assert all(torch.equal(v, state[k]) for k, v in sam.state_dict().items())
    state["mask_decoder.iou_prediction_head.layers.0.weight"] = torch.zeros(128, 32)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match=r"odd.pth does not fit a SAM ViT width 32, depth 2: wrong shapes: "
                                           r"mask_decoder\.iou_prediction_head\.layers\.0\.weight \(file \[128, 32\]"):
        load_sam(tmp_path / "odd.pth")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(WeightsError, match="other.pth is not a Segment Anything"):
        load_sam(other)
    with pytest.raises(WeightsError, match="not found"):
        load_sam(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read the SAM checkpoint"):
        load_sam(tmp_path / "text.pth")


def test_sam_masks_one_image_embedding_per_frame_one_mask_per_object(demo, tiny_sam):
    frames, boxes = textured_clip(5)
    masker = SamMasker(load_sam(tiny_sam))
    embeddings = []
    masker.sam.image_encoder.register_forward_hook(lambda *_: embeddings.append(1))
    prompts = []
    predict = masker.predictor.predict_torch
    masker.predictor.predict_torch = lambda *a, **k: prompts.append(k["boxes"].shape[0]) or predict(*a, **k)
    session = VotSession(demo, masker, "mask")
    starts = [Start(tuple(map(float, boxes[0]))), Start((200.0, 30.0, 40.0, 50.0)), Start((20.0, 150.0, 50.0, 40.0))]
    first = session.initialize(frames[0], starts)
    assert len(embeddings) == 1 and prompts == [3]  # the first frame's masks come from the given boxes
    for k, frame in enumerate(frames[1:], start=2):
        answers = session.frame(frame)
        assert len(embeddings) == k and prompts[-1] == 3  # one embedding, three prompts
        assert len(answers) == 3
        assert all(a.mask.shape == frame.shape[:2] and a.mask.dtype == bool for a in answers)
    assert all(a.mask.shape == frames[0].shape[:2] for a in first)
    empty = masker(frames[0], np.array([[10.0, 10.0, 10.0, 40.0]]))  # a target that left: no prompt, empty mask
    assert empty.shape == (1, *frames[0].shape[:2]) and not empty.any() and len(embeddings) == 5


# ----------------------------------------------------------------------------- trackers.ini


def test_trackers_ini_entry_has_absolute_paths_and_this_python(tmp_path, monkeypatch):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    entry = trackers_ini("LoRAT-B", ["--weights", "w.safetensors", "--sam-weights=w.safetensors", "--device", "cpu"])
    assert f"command = {sys.executable} -m lorat.vot --weights {weights} --sam-weights={weights} --device cpu" \
        in entry
    assert entry.startswith("[LoRAT-B]\nlabel = LoRAT-B\nprotocol = trax\n") and "timeout = 300" in entry
    run = subprocess.run([sys.executable, "-m", "lorat.vot", "--ini", "bad name"], capture_output=True, text=True)
    _one_error_line(run, "--ini 'bad name': a VOT tracker name is letters, digits, '_' and '-'")


# ----------------------------------------------------------------------------- the toolkit


def _registry(folder: Path, **entries: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trackers.ini").write_text("".join(trackers_ini(name, argv) for name, argv in entries.items()))
    return folder


def test_vot_test_passes_in_single_and_multi_object_mode(tmp_path):
    """The toolkit's own integration test on its generated dummy sequence (three objects in multi-object
    mode); both run at once, one CPU thread each."""
    _toolkit()
    registry = _registry(tmp_path, LoRAT=["--threads", "1"], LoRAT_single=["--single-object", "--threads", "1"])
    runs = {name: subprocess.Popen(["vot", "--registry", str(registry), "test", name], cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
            for name in ("LoRAT", "LoRAT_single")}
    logs = {name: run.communicate(timeout=300)[0] for name, run in runs.items()}
    for log in logs.values():
        assert "Test concluded successfuly" in log and "Error" not in log, log[-3000:]
        assert "using the bundled demo model" in log
    states = {name: [line for line in log.splitlines() if line.startswith("@@TRAX:state")]
              for name, log in logs.items()}
    assert len(states["LoRAT"]) == 3 * 50 and len(states["LoRAT_single"]) == 50
    assert '"trax.multiobject=1"' in logs["LoRAT"] and '"trax.multiobject=1"' not in logs["LoRAT_single"]
    for line in states["LoRAT"][-3:] + states["LoRAT_single"][-1:]:  # @@TRAX:state "x,y,w,h" "confidence=0.8"
        region, confidence = line.split('"')[1], line.split('"')[3]
        assert all(float(v).is_integer() for v in region.split(",")) and len(region.split(",")) == 4
        assert 0 <= float(confidence.removeprefix("confidence=")) <= 1


@pytest.mark.slow  # the toolkit's TraX client in another process
def test_toolkit_receives_sam_masks_as_computed_in_process(tmp_path, tiny_sam, demo):
    """Through the toolkit's own runtime: masks in (a VOTS-like sequence of three mask objects), SAM masks
    out, which the toolkit decodes to exactly the frame-sized masks of an in-process session."""
    _toolkit()
    from vot.dataset import load_sequence
    from vot.experiment.helpers import MultiObjectHelper
    from vot.region import Mask
    from vot.tracker import ObjectStatus, Registry

    sequence = load_sequence(str(write_sequence(tmp_path / "sequences", "three", frames=5, objects=3, masks=True)))
    registry = Registry([str(_registry(tmp_path / "trackers", LoRAT=["--sam-weights", str(tiny_sam),
                                                                      "--dtype", "float32"]))])
    helper = MultiObjectHelper(sequence)
    received = []
    with registry["LoRAT"].runtime(log=False) as runtime:
        frame = sequence.frame(0)
        state, _ = runtime.initialize(frame, [ObjectStatus(frame.object(x), {}) for x in helper.new(0)])
        received.append(state)
        for i in range(1, len(sequence)):
            received.append(runtime.update(sequence.frame(i), [])[0])

    height, width = sequence.size[1], sequence.size[0]
    session = VotSession(demo, SamMasker(load_sam(tiny_sam)), "auto")
    images = [cv2.cvtColor(cv2.imread(sequence.frame(i).filename()), cv2.COLOR_BGR2RGB) for i in range(len(sequence))]
    starts = [start_from_mask(sequence.frame(0).object(x).mask, sequence.frame(0).object(x).offset, (height, width), k)
              for k, x in enumerate(helper.new(0))]
    expected = [session.initialize(images[0], starts)] + [session.frame(image) for image in images[1:]]
    assert any(0 < a.mask.sum() < a.mask.size for answers in expected[1:] for a in answers)  # SAM's, not boxes
    for got, want in zip(received, expected, strict=True):
        assert len(got) == 3
        for status, answer in zip(got, want, strict=True):
            assert isinstance(status.region, Mask)
            np.testing.assert_array_equal(status.region.rasterize((0, 0, width - 1, height - 1)) > 0, answer.mask)
            assert float(status.properties["confidence"]) == pytest.approx(answer.score, abs=1e-4)


def _one_error_line(run: subprocess.CompletedProcess, text: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_bad_inputs_end_with_one_error_line(tmp_path, tiny_sam):
    fake = tmp_path / "no_toolkit" / "trax"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named trax')\n")
    vot = [sys.executable, "-m", "lorat.vot"]
    no_trax = subprocess.run(vot, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**_env(), "PYTHONPATH": str(fake.parent)})
    _one_error_line(no_trax, "needs the TraX bindings, which are not installed: pip install 'lorat[vot]'")
    missing = subprocess.run([*vot, "--sam-weights", str(tmp_path / "sam_vit_h.pth")], capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, env=_env())
    _one_error_line(missing, f"SAM checkpoint {tmp_path / 'sam_vit_h.pth'} not found")

    _toolkit()  # an empty initial mask, through the toolkit: the session ends with our message
    from vot.dataset import load_sequence
    from vot.tracker import ObjectStatus, Registry, TrackerException

    folder = write_sequence(tmp_path / "sequences", "empty", frames=3, objects=2, masks=True)
    truth = (folder / "groundtruth_001.txt").read_text().splitlines()
    (folder / "groundtruth_001.txt").write_text("\n".join(["m0,0,320,240,76800", *truth[1:]]) + "\n")
    sequence = load_sequence(str(folder))
    frame = sequence.frame(0)
    runtime = Registry([str(_registry(tmp_path / "trackers", LoRAT=[]))])["LoRAT"].runtime(log=False)
    with pytest.raises(TrackerException, match="object 2: the initial mask is empty"):
        runtime.initialize(frame, [ObjectStatus(frame.object(x), {}) for x in sequence.objects()])
    runtime.stop()


@pytest.mark.slow
def test_offline_workspace_runs_vot_evaluate_and_vot_analysis(tmp_path):
    """The README's offline workspace: generated box sequences, ``vot evaluate`` then ``vot analysis``."""
    _toolkit()
    workspace = write_workspace(tmp_path / "ws", ["--threads", "1"], sequences=2, frames=30)
    for command in (["evaluate", "--workspace", str(workspace), "LoRAT"],
                    ["analysis", "--workspace", str(workspace), "LoRAT"]):
        run = subprocess.run(["vot", *command], cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600)
        assert run.returncode == 0 and "successful" in run.stdout + run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
    for name, frames in (("lorat-boxes-1", 30), ("lorat-boxes-2", 40)):
        folder = workspace / "results" / "LoRAT" / "baseline" / name
        assert len((folder / f"{name}_001_confidence.value").read_text().split()) == frames
    report = json.loads(next((workspace / "analysis").glob("*.json")).read_text())
    quality = report["results"]["baseline"]["results"][0][0][0]
    assert 0.5 < quality <= 1.0  # the demo model follows the generated objects

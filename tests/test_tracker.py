"""The tracking loop: official fixture, literal reference on other grids, batching, identities."""

import cv2
import numpy as np
import pytest
import torch

from lorat.checkpoint.build import build_lorat
from lorat.checkpoint.loader import load_model
from lorat.config import config_from_dict
from lorat.errors import LoratError
from lorat.model.lora import merge_lora
from lorat.runtime import resolve_device
from lorat.tracking.step import TrackState, init_state, to_frame_tensor, track_step
from lorat.tracking.tracker import Tracker

from . import reference
from .helpers import bright_spot_model, textured_clip, write_dinov2


def _fixture_frames(tiny_dir):
    paths = sorted((tiny_dir / "sequence").glob("*.png"))
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


def test_official_fixture_sequence(tiny_dir, tiny_config, tiny_files):
    model, cfg = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    tracker = Tracker(model, cfg)
    init = [float(v) for v in (tiny_dir / "init_box.txt").read_text().split(",")]
    results = [r.targets[0] for r in tracker.stream(_fixture_frames(tiny_dir), init)]
    boxes = np.array([r.box for r in results])
    scores = np.array([r.score for r in results])
    np.testing.assert_allclose(boxes, np.loadtxt(tiny_dir / "expected_boxes.txt"), atol=0.05, rtol=0)
    np.testing.assert_allclose(scores, np.loadtxt(tiny_dir / "expected_confidence.txt"), atol=1e-4, rtol=0)


def _random_tracker_model(tmp_path, **model):
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2}} | model.pop("m", {}),
                            "tracking": model.pop("t", {})})
    net = merge_lora(build_lorat(cfg.model, write_dinov2(cfg, tmp_path / "d.pth"))).eval()
    return net, cfg


@pytest.mark.parametrize("spec", [
    {"m": {"template_size": 196, "search_size": 378}, "t": {"search_area_factor": 5.0}},       # 378 style
    {"m": {"template_size": [112, 84], "search_size": [252, 168]}, "t": {"search_area_factor": 4.5}},
    {"m": {"backbone": {"embed_dim": 32, "depth": 1, "num_heads": 4, "ffn": "swiglu"},
           "template_size": 84, "search_size": 182}, "t": {"window_penalty": 0.3, "min_object_size": 30}},
])
def test_matches_literal_reference_on_other_grids(tmp_path, spec):
    model, cfg = _random_tracker_model(tmp_path, **spec)
    frames, boxes = textured_clip(8)
    ours = [r.targets[0] for r in Tracker(model, cfg).stream(frames, boxes[0])]
    ref_boxes, ref_scores = reference.track(model, cfg, frames, boxes[0])
    np.testing.assert_allclose(np.array([r.box for r in ours]), ref_boxes, atol=0.05, rtol=0)
    np.testing.assert_allclose(np.array([r.score for r in ours]), ref_scores, atol=1e-4, rtol=0)


def test_batched_sequences_equal_single(tmp_path):
    model, cfg = _random_tracker_model(tmp_path)
    clips = [textured_clip(4, seed=s) for s in (1, 2)]
    frames = [[to_frame_tensor(f, model.device) for f in clip[0]] for clip in clips]
    first_boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (c[1][0] for c in clips)], dtype=torch.float64)
    both = init_state([f[0] for f in frames], first_boxes, model, cfg.tracking)
    singles = [init_state([frames[i][0]], first_boxes[i:i + 1], model, cfg.tracking) for i in range(2)]
    for t in range(1, 4):
        step = track_step(model, both, [frames[0][t], frames[1][t]], cfg.tracking)
        both = step.state
        for i in range(2):
            one = track_step(model, singles[i], [frames[i][t]], cfg.tracking)
            singles[i] = one.state
            torch.testing.assert_close(one.box[0], step.box[i], atol=1e-4, rtol=0)
            torch.testing.assert_close(one.score[0], step.score[i], atol=1e-5, rtol=0)
    joined = TrackState.cat(singles)
    assert len(joined) == 2 and torch.equal(joined.select([1]).box, singles[1].box)


def _two_squares_clip():
    """Two identical white squares; B disappears for three frames, then comes back."""
    a, b = (300, 170, 20, 20), (326, 170, 20, 20)

    def frame(with_b):
        f = np.zeros((360, 640, 3), np.uint8)
        for (x, y, w, h), on in ((a, True), (b, with_b)):
            if on:
                f[y:y + h, x:x + w] = 255
        return f

    return [frame(True)] * 3 + [frame(False)] * 3 + [frame(True)] * 6, a, b


def _nearest(result, a, b):
    cx = result.box[0] + result.box[2] / 2
    return "a" if abs(cx - (a[0] + 10)) < abs(cx - (b[0] + 10)) else "b"


def test_assignment_keeps_look_alikes_apart():
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    model = bright_spot_model(cfg)
    frames, a, b = _two_squares_clip()
    final = {}
    for assignment in (False, True):
        tracker = Tracker(model, cfg, assignment=assignment)
        tracker.init(frames[0], [a, b])
        for frame in frames[1:]:
            results = tracker.track_all(frame)
        final[assignment] = [_nearest(r, a, b) for r in results]
    assert final[False] == ["a", "a"]  # independent tracking: B's tracker jumped to A and stayed
    assert final[True] == ["a", "b"]  # with assignment each keeps its own object


def test_assignment_leaves_targets_that_do_not_compete_alone():
    """Two different objects far apart: with assignment on, each target gets exactly the boxes a
    tracker of its own gives (assignment only acts when targets compete for one peak)."""
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    model = bright_spot_model(cfg)
    frames = []
    for t in range(6):
        frame = np.zeros((240, 320, 3), np.uint8)
        frame[60 + 2 * t:80 + 2 * t, 40 + 3 * t:60 + 3 * t] = 250  # A, bright
        frame[150 - t:175 - t, 230 - 2 * t:260 - 2 * t] = 120      # B, dimmer and larger
        frames.append(frame)
    a, b = (40, 60, 20, 20), (230, 150, 30, 25)
    together = [r.targets for r in Tracker(model, cfg, assignment=True).stream(frames, [a, b])]
    alone_a = [r.targets[0] for r in Tracker(model, cfg).stream(frames, a)]
    alone_b = [r.targets[0] for r in Tracker(model, cfg).stream(frames, b)]
    assert [t[0].box for t in together] == [r.box for r in alone_a]
    assert [t[1].box for t in together] == [r.box for r in alone_b]
    assert alone_a[-1].box != alone_a[0].box  # it did move


def test_add_starts_a_target_later_beside_the_others():
    """``add`` on frame 2 (after ``track_all``): the new target follows the others and is tracked as a
    tracker of its own started on frame 2 tracks it; ``add`` without targets is ``init``."""
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    model = bright_spot_model(cfg)
    frames = []
    for t in range(6):
        frame = np.zeros((240, 320, 3), np.uint8)
        frame[60 + 2 * t:80 + 2 * t, 40 + 3 * t:60 + 3 * t] = 250
        frame[150 - t:175 - t, 230 - 2 * t:260 - 2 * t] = 120
        frames.append(frame)
    a, b = (40, 60, 20, 20), (226, 148, 30, 25)
    tracker = Tracker(model, cfg)
    assert tracker.add(frames[0], a)[0].box == a and tracker.num_targets == 1
    tracker.track_all(frames[1])
    tracker.track_all(frames[2])
    assert tracker.add(frames[2], b)[0].score == 1.0 and tracker.num_targets == 2
    later = [tracker.track_all(f) for f in frames[3:]]
    alone_a = [r.targets[0].box for r in Tracker(model, cfg).stream(frames, a)][3:]
    alone_b = [r.targets[0].box for r in Tracker(model, cfg).stream(frames[2:], b)][1:]
    assert [r[0].box for r in later] == alone_a and [r[1].box for r in later] == alone_b


def test_stream_repeats_boxes_on_unreadable_frames_and_keeps_the_state(tmp_path):
    model, cfg = _random_tracker_model(tmp_path)
    frames, boxes = textured_clip(5)
    full = [r.targets[0] for r in Tracker(model, cfg).stream(frames, boxes[0])]
    holed = list(Tracker(model, cfg).stream([frames[0], frames[1], None, frames[2], frames[3]], boxes[0]))
    assert [r.index for r in holed] == [0, 1, 2, 3, 4] and holed[2].frame is None
    assert holed[2].targets[0].box == full[1].box and holed[2].targets[0].score == 0.0
    assert [r.targets[0].box for r in holed[3:]] == [r.box for r in full[2:4]]  # the hole changed nothing
    with pytest.raises(LoratError, match="first frame"):
        next(Tracker(model, cfg).stream([None, frames[1]], boxes[0]))


def test_target_leaving_the_frame():
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    tracker = Tracker(bright_spot_model(cfg), cfg)
    frames = []
    for i in range(30):
        f = np.zeros((120, 160, 3), np.uint8)
        x = 120 + 4 * i
        if x < 160:
            f[50:70, x:min(x + 20, 160)] = 255
        frames.append(f)
    results = [r.targets[0] for r in tracker.stream(frames, (120, 50, 20, 20))]
    for r in results:  # always inside the frame, never NaN
        x, y, w, h = r.box
        assert np.isfinite(r.box).all() and x >= 0 and y >= 0 and x + w <= 160 + 1e-6 and y + h <= 120 + 1e-6
    assert results[-1].score < 0.3  # nothing bright left: the score says the target is lost


@pytest.mark.parametrize("box, message", [
    ((10, 10, 0, 20), "positive width and height"),
    ((10, 10, 20, -5), "positive width and height"),
    ((700, 10, 20, 20), "outside the 320x240 frame"),
    ((float("nan"), 10, 20, 20), "non-finite"),
    ((10, 10, float("inf"), 20), "non-finite"),
])
def test_bad_init_boxes(tmp_path, box, message):
    model, cfg = _random_tracker_model(tmp_path)
    frames, _ = textured_clip(1)
    with pytest.raises(LoratError, match=message):
        Tracker(model, cfg).init(frames[0], box)


def test_non_finite_outputs_raise(tmp_path):
    """Damaged weights make NaN boxes and scores: an error, never a NaN result."""
    model, cfg = _random_tracker_model(tmp_path)
    with torch.no_grad():
        model.head.reg_mlp.layers[-1].bias.fill_(float("nan"))
    frames, boxes = textured_clip(2)
    tracker = Tracker(model, cfg)
    tracker.init(frames[0], boxes[0])
    with pytest.raises(LoratError, match="non-finite boxes or scores"):
        tracker.track(frames[1])


@pytest.mark.parametrize("device, message", [
    ("banana", "unknown device 'banana'"),
    ("cuda:", "unknown device 'cuda:'"),
    ("meta", "unsupported device 'meta'"),
    ("cuda:99", "cuda"),
    ("mps", "MPS is not available"),
])
def test_bad_devices(device, message):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(LoratError, match=message):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")


def test_frame_formats_agree(tmp_path):
    model, cfg = _random_tracker_model(tmp_path)
    frames, boxes = textured_clip(3)
    expected = [r.targets[0].box for r in Tracker(model, cfg).stream(frames, boxes[0])]
    as_chw = [torch.from_numpy(f).permute(2, 0, 1) for f in frames]
    assert [r.targets[0].box for r in Tracker(model, cfg).stream(as_chw, boxes[0])] == expected
    with pytest.raises(LoratError, match="HxWx3"):
        Tracker(model, cfg).init(np.zeros((10, 10)), (1, 1, 2, 2))
    with pytest.raises(LoratError, match="init"):
        Tracker(model, cfg).track(frames[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_gpu_tracking_matches_cpu(tiny_dir, tiny_config, tiny_files, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact float32 convolutions
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    init = [float(v) for v in (tiny_dir / "init_box.txt").read_text().split(",")]
    frames = _fixture_frames(tiny_dir)
    expected = np.loadtxt(tiny_dir / "expected_boxes.txt")
    gpu = Tracker.from_pretrained(tiny_files["trainable"], tiny_config, tiny_files["backbone"], device="cuda",
                                  dtype="float32")
    boxes = np.array([r.targets[0].box for r in gpu.stream(frames, init)])
    np.testing.assert_allclose(boxes, expected, atol=0.05, rtol=0)
    ref = load_file(tiny_files["forward"])
    for dtype in (torch.float16, torch.bfloat16):  # mixed precision: the model outputs stay close
        with torch.autocast("cuda", dtype=dtype), torch.inference_mode():
            out = gpu.model(ref["z"].cuda(), ref["x"].cuda(), ref["z_feat_mask"].cuda())
        assert (out["score_map"].cpu() - ref["score_map"]).abs().max() < 0.05
        assert (out["boxes"].cpu() - ref["boxes"]).abs().max() < 0.02


def test_cuda_graph_option_is_eager_off_cuda(tiny_dir, tiny_config, tiny_files):
    """``cuda_graph=True`` changes nothing where there is no CUDA device (the library may be given it anywhere)."""
    init = [float(v) for v in (tiny_dir / "init_box.txt").read_text().split(",")]
    frames = _fixture_frames(tiny_dir)[:6]
    model, cfg = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    plain = [r.targets[0].box for r in Tracker(model, cfg).stream(frames, init)]
    option = Tracker(model, cfg, cuda_graph=True)
    assert [r.targets[0].box for r in option.stream(frames, init)] == plain
    assert option._graph is None


def test_static_constants_share_one_tensor():
    from lorat.tracking.constants import const, static_constants

    assert const([1, 2], torch.float64, torch.device("cpu")) is not const([1, 2], torch.float64, torch.device("cpu"))
    store: dict = {}
    with static_constants(store):
        a = const([1, 2], torch.float64, torch.device("cpu"))
        assert const([1, 2], torch.float64, torch.device("cpu")) is a
        assert const([1, 2], torch.float32, torch.device("cpu")) is not a  # the dtype is part of the key
    assert len(store) == 2 and const([1, 2], torch.float64, torch.device("cpu")) is not a


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_graph_step_matches_eager(tiny_dir, tiny_config, tiny_files, monkeypatch):
    """The graphed step gives the eager step's boxes: the official trajectory in float32, the eager
    float16 boxes in float16, after a re-initialisation mid-stream and after a frame-size change."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    init = [float(v) for v in (tiny_dir / "init_box.txt").read_text().split(",")]
    frames = _fixture_frames(tiny_dir)
    expected = np.loadtxt(tiny_dir / "expected_boxes.txt")
    graphed = Tracker.from_pretrained(tiny_files["trainable"], tiny_config, tiny_files["backbone"], device="cuda",
                                      dtype="float32", cuda_graph=True)
    boxes = np.array([r.targets[0].box for r in graphed.stream(frames, init)])
    assert graphed._graph is not None
    np.testing.assert_allclose(boxes, expected, atol=0.05, rtol=0)

    def run(tracker: Tracker) -> np.ndarray:
        out = [r.targets[0].box for r in tracker.stream(frames[:8], init)]
        tracker.init(frames[8], out[-1])  # re-initialise: the graph takes the new template
        out += [tracker.track(f).box for f in frames[9:]]
        small = [np.ascontiguousarray(f[: f.shape[0] - 8, : f.shape[1] - 8]) for f in frames[:6]]
        out += [r.targets[0].box for r in tracker.stream(small, init)]  # another frame size: captured again
        return np.array(out)

    graphed.dtype = eager_dtype = torch.float16
    eager = Tracker(graphed.model, graphed.config, dtype=eager_dtype, cuda_graph=False)
    np.testing.assert_allclose(run(graphed), run(eager), atol=1e-3, rtol=0)


def test_auto_dtype_rule(monkeypatch):
    """auto: float16 on CUDA; bfloat16 on a native-bf16 CPU for networks at least BF16_MIN_WIDTH wide; else float32."""
    from lorat import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert runtime.resolve_dtype("auto", cpu, runtime.BF16_MIN_WIDTH) == torch.bfloat16
    assert runtime.resolve_dtype("auto", cpu, 192) is None  # the demo model's width
    assert runtime.resolve_dtype("auto", cpu) is None
    assert runtime.resolve_dtype("float32", cpu, 768) is None
    assert runtime.resolve_dtype("auto", torch.device("cuda"), 192) == torch.float16
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert runtime.resolve_dtype("auto", cpu, 768) is None


def test_weights_stored_in_the_autocast_dtype_give_identical_outputs(tiny_files, tiny_config):
    from safetensors.torch import load_file

    from lorat.runtime import cast_for_autocast

    model, _ = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    ref = load_file(tiny_files["forward"])
    inputs = (ref["z"], ref["x"], ref["z_feat_mask"])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(*inputs)
        assert cast_for_autocast(model, torch.bfloat16) is model
        after = model(*inputs)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    assert all(p.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
               for p in m.parameters())
    for key in ("score_map", "boxes"):
        assert torch.equal(before[key], after[key])


def _two_objects_frame() -> np.ndarray:
    frame = np.zeros((240, 320, 3), np.uint8)
    frame[60:80, 40:60] = 250
    frame[150:175, 230:260] = 120
    return frame


@pytest.mark.parametrize("boxes, message", [
    ([(40, 60, 20, 20), (40, 60, 20, 20)],
     r"init box 1 \(40, 60, 20, 20\) and init box 2 \(40, 60, 20, 20\) overlap \(IoU 1.00 > 0.9\)"),
    ([(230, 150, 30, 25), (40, 60, 20, 20), (41, 60, 20, 20)],  # near-duplicate: IoU 19/21
     r"init box 2 \(40, 60, 20, 20\) and init box 3 \(41, 60, 20, 20\) overlap \(IoU 0.90 > 0.9\)"),
    ([(300, 60, 40, 20), (300, 60, 30, 20)],  # the same once clipped to the frame
     r"init box 1 \(300, 60, 40, 20\) and init box 2 \(300, 60, 30, 20\) overlap \(IoU 1.00"),
])
def test_two_boxes_on_one_object_are_refused(boxes, message):
    """Identical boxes would track one object twice (identical outputs): refused, naming both."""
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    tracker = Tracker(bright_spot_model(cfg), cfg)
    with pytest.raises(LoratError, match=message):
        tracker.init(_two_objects_frame(), boxes)
    assert tracker.state is None
    with pytest.raises(LoratError, match="same object"):
        next(Tracker(bright_spot_model(cfg), cfg).stream([_two_objects_frame()], boxes))


def test_overlapping_but_distinct_boxes_are_accepted():
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    tracker = Tracker(bright_spot_model(cfg), cfg)
    tracker.init(_two_objects_frame(), [(40, 60, 20, 20), (42, 60, 20, 20)])  # IoU 18/22 = 0.82: two objects
    assert tracker.num_targets == 2


def test_adding_a_target_on_a_tracked_object_is_refused_and_keeps_the_targets():
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 8, "depth": 1, "num_heads": 2}}})
    tracker = Tracker(bright_spot_model(cfg), cfg)
    frame = _two_objects_frame()
    tracker.init(frame, [(230, 150, 30, 25), (40, 60, 20, 20)])
    now = tracker.track_all(frame)
    before = tracker.state.box.clone()
    assert now[1].box == pytest.approx((37.5, 57.5, 20, 20))  # target 2 on this frame
    with pytest.raises(LoratError, match=r"init box 1 \(37.5, 57.5, 20, 20\) overlaps target 2, now at "
                                         r"\(37.5, 57.5, 20, 20\) \(IoU 1.00 > 0.9\): that object is already tracked"):
        tracker.add(frame, now[1].box)
    with pytest.raises(LoratError, match="and init box 2 .* overlap"):  # two new boxes on one new object
        tracker.add(frame, [(100, 100, 20, 20), (100, 100, 20, 20)])
    assert tracker.num_targets == 2 and torch.equal(tracker.state.box, before)
    twin = Tracker(tracker.model, cfg)  # the same targets without the refused additions
    twin.init(frame, [(230, 150, 30, 25), (40, 60, 20, 20)])
    twin.track_all(frame)
    assert tracker.track_all(frame) == twin.track_all(frame)  # tracking goes on as before
    assert tracker.add(frame, (100, 100, 20, 20))[0].box == (100, 100, 20, 20) and tracker.num_targets == 3

"""ONNX export and the onnxruntime backend (optional extra): same outputs, same trajectory."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorat.errors import WeightsError, run_cli
from lorat.export import main as export_main
from lorat.track import main as track_main
from lorat.tracking.tracker import Tracker

from .conftest import TINY

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MODEL = ["--config", str(TINY / "config.yaml"), "--weights", str(TINY / "lorat_trainable.safetensors"),
         "--backbone-weights", str(TINY / "dinov2_backbone.pth")]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert run_cli(export_main, [*MODEL, "--onnx", str(path)]) == 0
    return path


def test_onnxruntime_matches_the_official_forward(tiny_onnx):
    from lorat.checkpoint.onnx import load_onnx

    model, config = load_onnx(tiny_onnx)
    assert config.model.variant == "official-tiny"
    ref = load_file(TINY / "forward.safetensors")
    out = model(ref["z"], ref["x"], ref["z_feat_mask"])
    torch.testing.assert_close(out["score_map"], ref["score_map"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-4, rtol=0)


def test_cli_with_onnxruntime_reproduces_the_official_trajectory(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "boxes.txt"
    assert run_cli(track_main, [str(TINY / "sequence"), "--weights", str(tiny_onnx), "--backend", "onnxruntime",
                                "--init", "76,77,40,38", "--save-txt", str(out)]) == 0
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(TINY / "expected_boxes.txt"), atol=0.05, rtol=0)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "boxes_scores.txt"), np.loadtxt(TINY / "expected_confidence.txt"),
                               atol=1e-4, rtol=0)


def test_backend_errors_are_messages(tiny_onnx, tmp_path, capsys):
    sequence = str(TINY / "sequence")
    assert run_cli(track_main, [sequence, *MODEL, "--backend", "onnxruntime", "--init", "76,77,40,38"]) == 2
    assert "runs an .onnx file" in capsys.readouterr().err
    assert run_cli(track_main, [sequence, "--weights", str(tiny_onnx), "--backend", "torch",
                                "--init", "76,77,40,38"]) == 2
    assert "is an ONNX model" in capsys.readouterr().err
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_onnx.read_bytes()[:1000])
    assert run_cli(track_main, [sequence, "--weights", str(broken), "--init", "76,77,40,38"]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    with pytest.raises(Exception, match="CPU in float32"):
        Tracker.from_pretrained(tiny_onnx, device="cpu", dtype="bfloat16")


# ----------------------------------------------------------------------------- hostile files


def _with_config(proto, config: dict, path):
    """Save an ONNX proto with ``config`` as its embedded lorat config."""
    import json

    import onnx

    from lorat.checkpoint.files import CONFIG_KEY

    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = CONFIG_KEY, json.dumps(config)
    onnx.save(proto, str(path))
    return path


@pytest.fixture()
def no_session(monkeypatch):
    """Opening an ONNX Runtime session fails the test."""
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an inference session was opened")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


@pytest.mark.parametrize("template, search, message", [
    (160000, 160000, r"model\.template_size \[160000, 160000\] must be positive multiples of patch_size 14"),
    (160006, 160006, r"model\.template_size \[160006, 160006\] exceeds 4096 px per side"),
    (112, 160006, r"model\.search_size \[160006, 160006\] exceeds 4096 px per side"),
    (112, 252, r"x is declared as float32 \['batch', 3, 224, 224\], but the embedded config \(official-tiny\) "
               r"makes it float32 \[batch, 3, 252, 252\]"),
    (126, 224, r"z is declared as float32 \['batch', 3, 112, 112\].*\[batch, 3, 126, 126\]"),
], ids=["not-a-patch-multiple", "huge", "huge-search", "search-not-the-graph's", "template-not-the-graph's"])
def test_embedded_sizes_checked_before_a_session(tiny_onnx, tmp_path, no_session, capsys, template, search, message):
    """Only the metadata's crop sizes changed: refused before ONNX Runtime or the tracker allocates anything."""
    import onnx

    from lorat.checkpoint.onnx import load_onnx
    from lorat.config import config_to_dict, load_config

    config = config_to_dict(load_config(TINY / "config.yaml"))
    config["model"] |= {"template_size": [template, template], "search_size": [search, search]}
    bomb = _with_config(onnx.load(str(tiny_onnx), load_external_data=False), config, tmp_path / "bomb.onnx")
    with pytest.raises(WeightsError, match=rf"bomb\.onnx: .*{message}"):
        load_onnx(bomb)
    assert run_cli(track_main, [str(TINY / "sequence"), "--weights", str(bomb), "--init", "76,77,40,38"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bomb}: ") and len(err.strip().splitlines()) == 1


def test_another_network_with_our_metadata_is_refused_at_load(tmp_path, no_session, capsys):
    """A valid ONNX graph (one Identity node) carrying a LoRAT config: refused before any output."""
    from onnx import TensorProto, helper

    from lorat.checkpoint.onnx import load_onnx
    from lorat.config import config_to_dict, load_config

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "identity",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    config = config_to_dict(load_config(TINY / "config.yaml"))
    other = _with_config(helper.make_model(graph), config, tmp_path / "identity.onnx")
    message = (f"{other}: not a LoRAT network: its inputs are ['a'] and outputs ['b'] (expected inputs "
               f"['z', 'x', 'z_feat_mask'], outputs ['score_map', 'boxes'])")
    with pytest.raises(WeightsError) as err:
        load_onnx(other)
    assert str(err.value) == message
    kept = tmp_path / "boxes.txt"
    kept.write_text("the user's earlier results\n")
    assert run_cli(track_main, [str(TINY / "sequence"), "--weights", str(other), "--init", "76,77,40,38",
                                "--save-txt", str(kept)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert kept.read_text() == "the user's earlier results\n" and not (tmp_path / "boxes_scores.txt").exists()


def test_huge_embedded_sizes_under_an_address_space_cap(tiny_onnx, tmp_path):
    """The 25.6 GB case as a user meets it, in a process that cannot map more than 8 GB: one error line."""
    import onnx

    from lorat.config import config_to_dict, load_config

    from .helpers import run_capped

    config = config_to_dict(load_config(TINY / "config.yaml"))
    config["model"] |= {"template_size": [160006, 160006], "search_size": [160006, 160006]}
    bomb = _with_config(onnx.load(str(tiny_onnx), load_external_data=False), config, tmp_path / "huge.onnx")
    run = run_capped(["-m", "lorat.track", str(TINY / "sequence"), "--weights", str(bomb), "--init", "76,77,40,38"])
    assert run.returncode == 2 and run.stderr.startswith(f"error: {bomb}: ") and "Traceback" not in run.stderr


def test_export_leaves_other_files_alone(tmp_path):
    """Under 2 GB the network is one file: a user's ``<name>.data`` beside it is not touched, nothing else is
    written, and re-exporting replaces only the .onnx file."""
    user = tmp_path / "tiny.onnx.data"
    user.write_text("the user's file\n")
    out = tmp_path / "tiny.onnx"
    assert run_cli(export_main, [*MODEL, "--onnx", str(out)]) == 0
    assert user.read_text() == "the user's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]


def test_graph_declarations_must_be_the_networks(tmp_path, no_session):
    """Our input and output names, but a static batch axis, another element type or other sizes."""
    from onnx import TensorProto, helper

    from lorat.checkpoint.onnx import load_onnx
    from lorat.config import config_to_dict, load_config

    def graph(z_batch="batch", mask_type=TensorProto.INT64, grid=16):
        value = helper.make_tensor_value_info
        return helper.make_model(helper.make_graph(
            [helper.make_node("Identity", ["x"], ["score_map"]), helper.make_node("Identity", ["x"], ["boxes"])],
            "declared", [value("z", TensorProto.FLOAT, [z_batch, 3, 112, 112]),
                         value("x", TensorProto.FLOAT, ["batch", 3, 224, 224]),
                         value("z_feat_mask", mask_type, ["batch", 8, 8])],
            [value("score_map", TensorProto.FLOAT, ["batch", grid, grid]),
             value("boxes", TensorProto.FLOAT, ["batch", grid, grid, 4])]))

    config = config_to_dict(load_config(TINY / "config.yaml"))
    for proto, message in [(graph(z_batch=1), r"z is declared with shape \[1, 3, 112, 112\], expected \[batch, 3, "
                                              r"112, 112\] with a dynamic batch axis"),
                           (graph(mask_type=TensorProto.FLOAT), r"z_feat_mask is declared as float32 \['batch', 8, "
                                                                r"8\], but the embedded config .* makes it int64"),
                           (graph(grid=17), r"score_map is declared as float32 \['batch', 17, 17\], but the embedded "
                                            r"config \(official-tiny\) makes it float32 \[batch, 16, 16\]")]:
        with pytest.raises(WeightsError, match=message):
            load_onnx(_with_config(proto, config, tmp_path / "declared.onnx"))


# ----------------------------------------------------------------------------- the bundled model on ONNX Runtime


def test_the_bundled_onnx_file_is_the_recorded_one_and_the_same_network():
    """weights/lorat_demo.onnx is the file whose digest the loader trusts, and computes what the bundled
    safetensors file computes (an export of it)."""
    import hashlib

    from lorat.checkpoint.loader import load_model
    from lorat.checkpoint.onnx import OnnxModel
    from lorat.files import DEMO_ONNX_SHA256, bundled_onnx, bundled_weights

    assert hashlib.sha256(bundled_onnx().read_bytes()).hexdigest() == DEMO_ONNX_SHA256, \
        "weights/lorat_demo.onnx changed: re-export it (end of weights/train_demo.sh) and update DEMO_ONNX_SHA256"
    model, config = load_model(bundled_weights())
    onnx_model = OnnxModel(bundled_onnx())
    assert onnx_model.config.model == config.model and onnx_model.config.tracking == config.tracking
    generator = torch.Generator().manual_seed(0)
    m = config.model
    z = torch.rand(2, 3, m.template_size[1], m.template_size[0], generator=generator) * 4 - 2
    x = torch.rand(2, 3, m.search_size[1], m.search_size[0], generator=generator) * 4 - 2
    mask = torch.randint(0, 2, (2, *m.template_grid), generator=generator)
    with torch.no_grad():
        expected = model(z, x, mask)
    got = onnx_model(z, x, mask)
    for key in ("score_map", "boxes"):
        assert (got[key] - expected[key]).abs().max() < 1e-4, key


def _first_frames(count: int) -> list[np.ndarray]:
    import cv2

    from .conftest import ROOT

    capture = cv2.VideoCapture(str(ROOT / "assets" / "box.mp4"))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        assert ok
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def test_the_bundled_model_runs_on_onnx_runtime_by_default_with_torchs_boxes():
    """The default backend of the bundled model (named or by default) is ONNX Runtime on a CPU; its boxes
    on box.mp4 stay within 0.01 px of torch's."""
    from lorat.checkpoint.loader import load
    from lorat.files import bundled_weights
    from lorat.options import ModelOptions

    default, named = load(ModelOptions(None), say=None), load(ModelOptions(bundled_weights()), say=None)
    torch_backend = load(ModelOptions(None, backend="torch"), say=None)
    assert default.backend == named.backend == "onnxruntime" and torch_backend.backend == "torch"
    assert load(ModelOptions(None, dtype="bfloat16"), say=None).backend == "torch"  # ONNX Runtime runs float32
    frames = _first_frames(40)
    boxes = []
    for loaded in (default, torch_backend):
        tracker = Tracker.from_loaded(loaded)
        tracker.init(frames[0], (290, 14, 308, 228))
        boxes.append(np.array([tracker.track(frame).box for frame in frames[1:]]))
    assert np.abs(boxes[0] - boxes[1]).max() < 0.01


def test_a_changed_bundled_onnx_file_falls_back_to_torch(tmp_path, monkeypatch):
    """Only the recorded file skips the graph check: any other bytes, or no onnxruntime, mean torch."""
    import lorat.checkpoint.loader as loader
    from lorat.files import bundled_onnx
    from lorat.options import ModelOptions

    changed = tmp_path / "lorat_demo.onnx"
    changed.write_bytes(bundled_onnx().read_bytes() + b"\0")
    monkeypatch.setattr(loader, "bundled_onnx", lambda: changed)
    assert loader.load(ModelOptions(None), say=None).backend == "torch"
    monkeypatch.undo()
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # not installed
    assert loader.load(ModelOptions(None), say=None).backend == "torch"


@pytest.mark.slow
def test_the_bundled_onnx_file_is_reproducible(tmp_path):
    """Exporting the bundled safetensors file again gives the same bytes (the recorded digest)."""
    import hashlib

    from lorat.files import DEMO_ONNX_SHA256, bundled_weights

    out = tmp_path / "again.onnx"
    assert run_cli(export_main, ["--weights", str(bundled_weights()), "--onnx", str(out)]) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == DEMO_ONNX_SHA256

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

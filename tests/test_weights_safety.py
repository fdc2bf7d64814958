"""Hostile or damaged weight files: refused before any memory is spent, with a message that says why."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorat.checkpoint.files import CONFIG_KEY, FORMAT_KEY, read_weights
from lorat.checkpoint.loader import load_model, save_model
from lorat.config import config_to_dict
from lorat.errors import LoratError, WeightsError, run_cli

from .conftest import ROOT
from .helpers import tiny_config


@pytest.fixture()
def single_file(tmp_path):
    """A tiny model in our single-file format."""
    from lorat.model.vit import LoRAT

    cfg = tiny_config()
    torch.manual_seed(0)
    return save_model(LoRAT(cfg.model).eval(), cfg, tmp_path / "tiny.safetensors"), cfg


def _rewrite(path, out, config=None, tensors=None):
    """Copy a single file with its embedded config and/or tensors replaced."""
    sd, meta = read_weights(path)
    if config is not None:
        meta = meta | {CONFIG_KEY: json.dumps(config)}
    save_file(tensors if tensors is not None else sd, str(out), metadata=meta)
    return out


def test_huge_embedded_config_refused_before_building(single_file, tmp_path, monkeypatch):
    path, cfg = single_file
    d = config_to_dict(cfg)
    d["model"]["backbone"] |= {"embed_dim": 8192, "depth": 400, "num_heads": 64}
    bomb = _rewrite(path, tmp_path / "bomb.safetensors", config=d)
    import lorat.model.vit

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(lorat.model.vit.LoRAT, "__init__", refuse)
    with pytest.raises(WeightsError, match=r"bomb.safetensors: .*depth 400.*2 blocks"):
        load_model(bomb)
    d["model"]["backbone"] |= {"depth": 2}  # same depth as the file, far wider
    wide = _rewrite(path, tmp_path / "wide.safetensors", config=d)
    with pytest.raises(WeightsError, match=r"wide.safetensors: .*embed_dim 8192.*at least .* parameters"):
        load_model(wide)


def test_config_checked_against_tensor_shapes_before_building(single_file, tmp_path, monkeypatch):
    path, cfg = single_file
    d = config_to_dict(cfg)
    d["model"]["backbone"] |= {"embed_dim": 64, "num_heads": 2}  # plausible size, wrong shapes
    other = _rewrite(path, tmp_path / "other.safetensors", config=d)
    import lorat.model.vit

    real_init = lorat.model.vit.LoRAT.__init__
    devices = []

    def spy(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(lorat.model.vit.LoRAT, "__init__", spy)
    with pytest.raises(WeightsError, match=r"other.safetensors: .*does not fit .*wrong shapes"):
        load_model(other)
    assert devices == ["meta"]  # only a shape-only model was built


def test_non_finite_weights_refused(single_file, tmp_path):
    path, _ = single_file
    sd, _ = read_weights(path)
    sd["head.cls_mlp.layers.0.weight"][0, 0] = math.nan
    sd["blocks.1.attn.proj.weight"][1, 1] = math.inf
    bad = _rewrite(path, tmp_path / "nan.safetensors", tensors=sd)
    with pytest.raises(WeightsError, match=r"nan.safetensors: non-finite values \(NaN or inf\) in 2 tensors: "
                                           r"blocks\.1\.attn\.proj\.weight, head\.cls_mlp\.layers\.0\.weight"):
        load_model(bad)


@pytest.mark.parametrize("name, data, message", [
    ("random.pth", bytes(range(7, 250)) * 40, "not a safetensors or PyTorch weight file"),
    ("clip.mp4", b"\x00\x00\x00\x20ftypisom" + b"\x00" * 500, "a video file, not weights"),
    ("notes.safetensors", b"just some text\n" * 10, "not a safetensors or PyTorch weight file"),
], ids=["random-bytes", "mp4", "text"])
def test_non_weight_files_named_for_what_they_are(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(WeightsError) as err:
        read_weights(tmp_path / name)
    assert message in str(err.value) and "Python objects" not in str(err.value)


def test_bundled_clip_as_weights_is_a_clear_error(capsys):
    from lorat.track import main as track_main

    clip = str(ROOT / "assets" / "box.mp4")
    assert run_cli(track_main, [clip, "--weights", clip, "--init", "1,1,5,5", "--device", "cpu"]) == 2
    assert f"{clip}: is a video file, not weights" in capsys.readouterr().err


def test_single_file_bytes_are_stable(single_file, tmp_path):
    """Identical models give identical files (safetensors' metadata order varies between saves)."""
    path, _ = single_file
    model, config = load_model(path)
    outs = [save_model(model, config, tmp_path / f"again{i}.safetensors").read_bytes() for i in range(8)]
    assert all(o == path.read_bytes() for o in outs)
    sd, meta = read_weights(path)  # still a valid file with both metadata keys
    assert set(meta) == {CONFIG_KEY, FORMAT_KEY} and load_file(path).keys() == sd.keys()


def test_save_model_to_a_directory_is_an_error(single_file, tmp_path, capsys):
    from lorat.export import main as export_main

    path, cfg = single_file
    model, _ = load_model(path)
    with pytest.raises(LoratError, match=r"is a directory"):
        save_model(model, cfg, tmp_path)
    assert run_cli(export_main, ["--weights", str(path), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert run_cli(export_main, ["--weights", str(path), "--output", "/proc/lorat.safetensors"]) == 2
    assert "cannot write /proc/lorat.safetensors" in capsys.readouterr().err

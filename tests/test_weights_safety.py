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


# ----------------------------------------------------------------------------- Segment Anything checkpoints


@pytest.fixture(scope="module")
def sam_state() -> dict[str, torch.Size]:
    """The names and shapes of a small SAM (width 32, depth 2, 256 px), from a shape-only build."""
    pytest.importorskip("segment_anything", reason="pip install 'lorat[sam]'")
    from lorat.checkpoint.sam import SamArchitecture, sam_shapes

    return sam_shapes(SamArchitecture(width=32, depth=2, heads=2, global_blocks=(1,), window=4, patch=16,
                                      image_size=256, mlp_ratio=2.0, prompt_dim=32, decoder_mlp=64))


@pytest.fixture()
def sam_builds(sam_state, monkeypatch) -> list[str]:
    """The devices SAMs are built on (a shape-only build: "meta"); building one in memory fails the test."""
    from segment_anything.modeling import ImageEncoderViT

    real_init, devices = ImageEncoderViT.__init__, []

    def spy(self, *args, **kwargs):
        devices.append(torch.empty(0).device.type)
        if devices[-1] != "meta":
            raise AssertionError("a SAM was built")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ImageEncoderViT, "__init__", spy)
    return devices


def test_hollow_sam_declaring_a_huge_encoder_refused_before_building(sam_state, sam_builds, tmp_path):
    """A file of a few KB whose zero-length dimensions declare a 65536-wide image encoder."""
    from lorat.checkpoint.sam import load_sam

    hollow = {k: torch.zeros(*[65536 if n == 32 else n for n in shape[:-1]], 0) for k, shape in sam_state.items()}
    assert hollow["image_encoder.patch_embed.proj.weight"].shape == (65536, 3, 16, 0)
    torch.save(hollow, tmp_path / "hollow.pth")
    assert (tmp_path / "hollow.pth").stat().st_size < 100_000
    with pytest.raises(WeightsError, match=r"hollow\.pth: \d+ tensor\(s\) with a zero-size dimension "
                                           r"\(image_encoder\.pos_embed \[1, 16, 16, 0\]"):
        load_sam(tmp_path / "hollow.pth")
    assert sam_builds == []  # not even a shape-only one


@pytest.mark.parametrize("changes, message", [
    ({"image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(127, 0)},
     r"1 tensor\(s\) with a zero-size dimension \(image_encoder\.blocks\.0\.attn\.rel_pos_h \[127, 0\]\)"),
    ({"image_encoder.patch_embed.proj.weight": torch.zeros(1).expand(65536, 3, 16, 16)},
     r"its tensors declare [\d,]+ bytes but the file stores [\d,]+ \(expanded or shared tensors\)"),
    ({"image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(4095, 16)},
     r"windowed encoder blocks have windows \[2048\] \(one window, at most the 16-token grid"),
    ({"image_encoder.pos_embed": torch.zeros(1, 256, 256, 32), "image_encoder.blocks.1.attn.rel_pos_h":
      torch.zeros(7, 16)}, r"a SAM of 4096 px images, 256x256 tokens and 2 heads needs more than SAM's own models"),
    ({"image_encoder.blocks.1.attn.rel_pos_h": torch.zeros(31, 7)}, r"head sizes \[7, 16\] do not divide"),
    ({"image_encoder.blocks.0.mlp.lin1.weight": torch.zeros(64, 16)},
     r"does not fit a SAM ViT width 32, depth 2: wrong shapes: image_encoder\.blocks\.0\.mlp\.lin1\.weight"),
    ({"image_encoder.blocks.0.mlp.lin1.weight": torch.zeros(6400, 32)},
     r"declares a SAM of width 32, depth 2 \(256 px\), at least [\d,]+ parameters, but holds [\d,]+ values"),
    ({"mask_decoder.iou_token.weight": torch.zeros(1, 32, dtype=torch.int64)},
     r"a SAM's tensors are floating point, not mask_decoder\.iou_token\.weight \(int64\)"),
], ids=["rel-pos-zero-width", "expanded-storage", "window-past-the-grid", "beyond-sam-run-time", "head-size",
        "inconsistent-shape", "more-than-it-holds", "integer-tensor"])
def test_hostile_sam_files_refused_before_building(sam_state, sam_builds, tmp_path, changes, message):
    """Refused by the checks; at most a shape-only SAM is built (to compare names and shapes)."""
    from lorat.checkpoint.sam import load_sam

    torch.save({k: torch.zeros(shape) for k, shape in sam_state.items()} | changes, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=rf"bad\.pth\b.*{message}"):
        load_sam(tmp_path / "bad.pth")


def test_expanded_tensors_are_refused_before_any_use(tmp_path):
    """A 1.4 KB .pth can hold a stride-0 view declaring 17 GB: refused before the values are looked at."""
    path = tmp_path / "hollow.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(1).expand(65536, 65536)}, path)
    with pytest.raises(WeightsError, match="declare 17,179,869,184 bytes but the file stores 4"):
        read_weights(path)


@pytest.mark.parametrize("reader", ["weights", "sam"])
def test_pickle_refusal_never_suggests_unsafe_loading(tmp_path, reader):
    """torch's message advises ``weights_only=False`` (running the file's code): never repeated."""
    from lorat.checkpoint.sam import load_sam

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"a": Evil()}, path)
    with pytest.raises(WeightsError) as err:
        (read_weights if reader == "weights" else load_sam)(path)
    message = str(err.value)
    assert "(print)" in message and "refusing to unpickle" in message and "\n" not in message
    assert "weights_only" not in message and "False" not in message and "\x1b" not in message


def test_hostile_files_under_an_address_space_cap(sam_state, tmp_path):
    """The hollow SAM (51.5 GB declared) and an expanded-tensor checkpoint (17 GB declared), each read by a
    process that cannot map more than 8 GB: refused with one error line, never a MemoryError."""
    from .conftest import TINY
    from .helpers import run_capped

    hollow = {k: torch.zeros(*[65536 if n == 32 else n for n in shape[:-1]], 0) for k, shape in sam_state.items()}
    torch.save(hollow, tmp_path / "sam.pth")
    load = ("import sys; from lorat.errors import run_cli; from lorat.checkpoint.sam import load_sam; "
            "raise SystemExit(run_cli(lambda argv: load_sam(argv[0]) and 0, sys.argv[1:]))")
    run = run_capped(["-c", load, str(tmp_path / "sam.pth")])
    assert run.returncode == 2 and run.stderr.startswith("error: ") and len(run.stderr.splitlines()) == 1

    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(1).expand(65536, 65536)}, tmp_path / "expanded.pth")
    run = run_capped(["-m", "lorat.track", str(TINY / "sequence"), "--config", str(TINY / "config.yaml"),
                      "--weights", str(tmp_path / "expanded.pth"), "--init", "76,77,40,38"])
    assert run.returncode == 2 and "declare 17,179,869,184 bytes" in run.stderr and "Traceback" not in run.stderr

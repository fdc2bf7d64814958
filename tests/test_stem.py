"""The MobileNetV2 token stem of small CPU models, its weight loading and the photo-textured generator."""

import math

import cv2
import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file

from lorat.checkpoint.build import build_lorat
from lorat.checkpoint.files import detect_format, read_weights
from lorat.checkpoint.loader import load_model, save_model
from lorat.config import config_from_dict
from lorat.data.synthetic import _draw_quad, load_photos, make_clip
from lorat.errors import ConfigError, LoratError, WeightsError
from lorat.model.vit import sincos_pos_embed
from lorat.train import main

from .helpers import random_inputs


def _stem_config(**train):
    return config_from_dict({
        "model": {"variant": "stem-tiny", "template_size": 32, "search_size": 64,
                  "backbone": {"embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 2,
                               "patch_size": 16, "stem": "mobilenetv2", "layer_scale_init": 0.1}},
        "train": {"finetune": "full", **train},
    })


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory):
    """A torchvision MobileNetV2 file with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("mnv2") / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def test_stem_folds_batchnorm_exactly(imagenet_file):
    path, net = imagenet_file
    cfg = _stem_config()
    model = build_lorat(cfg.model, path, lora=False).eval()
    assert detect_format(*read_weights(path)) == "mobilenetv2"
    assert not any("running_mean" in k for k in model.state_dict())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = net.features[:14](x)  # (2, 96, 4, 3)
        tokens = model.patch_embed(x)
        projected = model.patch_embed.proj(expected).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 12, 32)
    torch.testing.assert_close(tokens, projected, atol=1e-5, rtol=1e-5)
    # the grid starts as a fixed sine-cosine grid (no DINOv2 grid to resample)
    torch.testing.assert_close(model.pos_embed, sincos_pos_embed(model.search_grid, 32))


def test_stem_model_single_file_roundtrip(imagenet_file, tmp_path):
    path, _ = imagenet_file
    cfg = _stem_config()
    model = build_lorat(cfg.model, path, lora=False).eval()
    out = save_model(model, cfg, tmp_path / "m.safetensors")
    loaded, loaded_cfg = load_model(out)
    assert loaded_cfg.model.backbone.stem == "mobilenetv2"
    inputs = random_inputs(cfg)
    with torch.no_grad():
        a, b = model(*inputs), loaded(*inputs)
    assert torch.equal(a["score_map"], b["score_map"]) and torch.equal(a["boxes"], b["boxes"])


def test_stem_errors(imagenet_file, tmp_path):
    path, _ = imagenet_file
    with pytest.raises(ConfigError, match="patch_size 16"):
        config_from_dict({"model": {"backbone": {"stem": "mobilenetv2"}}})
    with pytest.raises(ConfigError, match="freeze_stem"):
        config_from_dict({"train": {"freeze_stem": True}})
    with pytest.raises(WeightsError, match="MobileNetV2"):
        load_model(path, _stem_config())  # a stem file is not a tracker
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in torch.load(path).items() if "running_var" not in k}, broken)
    with pytest.raises(WeightsError, match="not a complete torchvision MobileNetV2"):
        build_lorat(_stem_config().model, broken, lora=False)
    other = tmp_path / "other.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(4), "patch_embed.proj.weight": torch.ones(4, 3, 14, 14)}, other)
    with pytest.raises(WeightsError, match="needs torchvision's ImageNet MobileNetV2"):
        build_lorat(_stem_config().model, other, lora=False)


def test_sincos_pos_embed_values():
    pe = sincos_pos_embed((3, 4), 8)  # 2 frequencies: 1 and 1/100
    assert pe.shape == (1, 12, 8)
    row, col = 2, 3  # token 11
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(pe[0, 11], torch.tensor(expected), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        sincos_pos_embed((2, 2), 6)


def test_train_frozen_stem_and_lora_refused(imagenet_file, synthetic, tmp_path):
    path, _ = imagenet_file
    cfg_file = tmp_path / "stem.yaml"
    cfg_file.write_text(
        "model: {variant: stem-tiny, template_size: 32, search_size: 64, backbone: {embed_dim: 32, depth: 1,"
        " num_heads: 2, mlp_ratio: 2, patch_size: 16, stem: mobilenetv2, layer_scale_init: 0.1}}\n"
        "train: {finetune: full, freeze_stem: true, batch_size: 4, samples_per_epoch: 8, epochs: 1,"
        " num_workers: 0, val_samples: 0, min_object_size: 4}\n")
    args = [str(cfg_file), "--backbone-weights", str(path), "--data", f"lasot={synthetic}"]
    assert main([*args, "--output", str(tmp_path / "run")]) == 0
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["weights"]
    assert not any(k.startswith("patch_embed.features.") for k in state)  # frozen: rebuilt from the file
    trained = load_file(tmp_path / "run" / "checkpoint" / "epoch_001" / "lorat.safetensors")
    start = build_lorat(_stem_config().model, path, lora=False).state_dict()
    stem_keys = [k for k in start if k.startswith("patch_embed.features.")]
    assert stem_keys and all(torch.equal(trained[k], start[k]) for k in stem_keys)
    assert not torch.equal(trained["patch_embed.proj.weight"], start["patch_embed.proj.weight"])
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    with pytest.raises(LoratError, match="finetune full"):
        main([*args, "--output", str(tmp_path / "lora"), "--set", "train.finetune=lora",
              "--set", "train.freeze_stem=false"])


def test_draw_quad_box_is_the_drawn_pixels():
    frame = np.zeros((60, 80, 3), np.uint8)
    patch = np.full((10, 10, 3), 200, np.uint8)
    quad = np.float32([[10, 20], [30, 20], [30, 35], [10, 35]])  # axis-aligned 20 x 15
    x, y, w, h = _draw_quad(frame, patch, quad)
    ys, xs = np.nonzero(frame[..., 0])
    assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())  # exactly the drawn pixels
    assert abs(x - 10) <= 1 and abs(y - 20) <= 1 and abs(w - 20) <= 1 and abs(h - 15) <= 1
    assert _draw_quad(frame, patch, quad + 500) is None  # entirely outside


def test_photo_clips(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(3):
        photo = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"p{k}.png"), cv2.GaussianBlur(photo, (9, 9), 3))
    (tmp_path / "notes.txt").write_text("not an image")
    photos = load_photos([tmp_path])
    assert len(photos) == 3 and photos[0].shape == (120, 160, 3)
    clips = [list(make_clip(np.random.default_rng([1, k]), 12, (160, 120), photos)) for k in range(6)]
    again = list(make_clip(np.random.default_rng([1, 0]), 12, (160, 120), photos))
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(clips[0], again, strict=True))  # seeded
    for clip in clips:
        for frame, (x, y, w, h), _ in clip:
            assert frame.shape == (120, 160, 3)
            assert x >= 0 and y >= 0 and w >= 2 and h >= 2 and x + w <= 160 and y + h <= 120
    # large targets (up to 65 % of the frame) stay inside it
    for k in range(4):
        for t, (_frame, (x, y, w, h), _) in enumerate(make_clip(np.random.default_rng([2, k]), 8, (160, 120), photos,
                                                               target_size=(0.55, 0.65), two_faced=1.0)):
            assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 120
            if t == 0:
                assert w >= 0.3 * 160 and h >= 0.3 * 120
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoratError, match="no readable"):
        load_photos([empty])
    with pytest.raises(LoratError, match="not found"):
        load_photos([tmp_path / "missing"])


def test_synthetic_cli_rejects_bad_options(tmp_path, capsys):
    from lorat.data.synthetic import main as synthetic_main
    from lorat.errors import run_cli

    for bad in (["--target-size", "0.5"], ["--target-size", "0.4,0.2"], ["--target-size", "0.1,0.9"],
                ["--two-faced", "1.5"], ["--photos", str(tmp_path / "missing")]):
        assert run_cli(synthetic_main, [str(tmp_path / "out"), "--sequences", "1", "--frames", "2", *bad]) == 2
        assert "error:" in capsys.readouterr().err

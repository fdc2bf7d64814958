from pathlib import Path

import pytest

from lorat.config import config_from_dict, config_to_dict, load_config, swiglu_hidden_size
from lorat.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["s224", "s378", "b224", "b378", "l224", "l378", "g224", "g378"])
def test_official_variant_configs(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    size = int(name[1:])
    assert cfg.model.variant == f"{name[0].upper() if name[0] != 'g' else 'g'}-{size}"
    assert cfg.model.search_size == (size, size)
    assert cfg.model.lora.r == 64 and cfg.model.lora.alpha == 64
    assert cfg.tracking.template_area_factor == 2.0
    assert cfg.tracking.search_area_factor == (4.0 if size == 224 else 5.0)
    assert cfg.model.template_grid == ((8, 8) if size == 224 else (14, 14))
    assert cfg.model.search_grid == ((16, 16) if size == 224 else (27, 27))
    assert cfg.model.backbone.ffn == ("swiglu" if name[0] == "g" else "mlp")


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: {embed_dim: 96, depht: 2}\n")
    with pytest.raises(ConfigError, match=r"model\.backbone\.depht"):
        load_config(p)
    p.write_text("trackin: {}\n")
    with pytest.raises(ConfigError, match="trackin"):
        load_config(p)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"model": {"backbone": {"depth": "two"}}}, "depth: expected an integer"),
        ({"model": {"backbone": {"ffn": "geglu"}}}, "ffn: expected one of"),
        ({"model": {"search_size": 230}}, "multiples of patch_size"),
        ({"model": {"template_size": 252, "search_size": 224}}, "must not exceed"),
        ({"model": {"backbone": {"embed_dim": 100, "num_heads": 3}}}, "divisible by num_heads"),
        ({"tracking": {"window_penalty": 2}}, "window_penalty"),
        ({"model": {"search_size": [224]}}, r"\[W, H\]"),
    ],
)
def test_bad_values(data, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_custom_small_backbone_and_rectangular_sizes():
    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 64, "depth": 3, "num_heads": 4,
                                                   "ffn": "swiglu"},
                                      "template_size": [84, 56], "search_size": [168, 112]}})
    assert cfg.model.template_grid == (4, 6)  # (H, W)
    assert cfg.model.search_grid == (8, 12)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_and_missing_file(tmp_path):
    cfg = load_config(CONFIGS / "b224.yaml", ["tracking.window_penalty=0.3", "model.lora.r=16"])
    assert cfg.tracking.window_penalty == 0.3 and cfg.model.lora.r == 16
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown config key tracking.nope"):
        load_config(CONFIGS / "b224.yaml", ["tracking.nope=1"])
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="not a YAML config .*--weights"):
        load_config(binary)


def test_swiglu_hidden_rule():
    assert swiglu_hidden_size(1536, 4) == 4096  # ViT-g
    assert swiglu_hidden_size(100, 4) == 272  # int(400 * 2 / 3) = 266 -> rounded up to 8


def test_one_dataset_argument_syntax():
    """``NAME=PATH`` and ``NAME:SPLIT=PATH``, for training (--data) and evaluation (--dataset) alike."""
    from lorat.data.sequences import parse_dataset_arg
    from lorat.errors import LoratError
    from lorat.evaluate import _dataset_arg

    assert parse_dataset_arg("got10k:val=/d", "--data") == ("got10k", "/d", "val")
    assert parse_dataset_arg("lasot=/d", "--data") == ("lasot", "/d", None)
    for bad in ("x", "imagenet=/d", "lasot=", "lasot:=/d"):
        with pytest.raises(LoratError):
            parse_dataset_arg(bad, "--data")
    assert _dataset_arg("got10k:test=/d", None) == ("got10k", "/d", "test")
    assert _dataset_arg("got10k=/d", None) == ("got10k", "/d", "val")
    for text, split, message in [("coco=/d", None, "unknown evaluation dataset 'coco'"),
                                 ("got10k:val=/d", "test", "asks for split 'val', --split for 'test'"),
                                 ("lasot=/d", "val", "dataset lasot has no split 'val'")]:
        with pytest.raises(LoratError, match=message):
            _dataset_arg(text, split)

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorat.checkpoint.build import build_lorat, load_backbone
from lorat.checkpoint.files import detect_format, read_weights
from lorat.checkpoint.keys import peft_to_official_keys
from lorat.checkpoint.loader import load_model, save_model
from lorat.config import config_from_dict, config_to_dict
from lorat.errors import WeightsError

from .helpers import official_trainable, random_inputs, tiny_config, write_dinov2


def _out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture()
def official(tiny_config, tiny_files):
    model, cfg = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    return model, cfg, load_file(tiny_files["forward"])


def _ref_inputs(ref):
    return ref["z"], ref["x"], ref["z_feat_mask"]


def test_export_reload_identical(official, tmp_path):
    model, cfg, ref = official
    path = save_model(model, cfg, tmp_path / "tiny.safetensors")
    sd, meta = read_weights(path)
    assert detect_format(sd, meta) == "lorat"
    again, cfg2 = load_model(path)  # one file: no config, no backbone needed
    assert cfg2 == cfg
    a, b = _out(model, _ref_inputs(ref)), _out(again, _ref_inputs(ref))
    assert torch.equal(a["score_map"], b["score_map"]) and torch.equal(a["boxes"], b["boxes"])


def test_export_half(official, tmp_path):
    model, cfg, ref = official
    path = save_model(model, cfg, tmp_path / "half.safetensors", dtype=torch.float16)
    assert path.stat().st_size < 0.6 * save_model(model, cfg, tmp_path / "f.safetensors").stat().st_size
    half, _ = load_model(path)
    assert half.pos_embed.dtype == torch.float32  # computed in float32 unless asked otherwise
    assert load_model(path, dtype=torch.float16)[0].pos_embed.dtype == torch.float16
    out = _out(half, _ref_inputs(ref))
    torch.testing.assert_close(out["score_map"], ref["score_map"], atol=5e-3, rtol=0)


def test_save_model_merges_lora_copy(tmp_path):
    cfg = tiny_config()
    model = build_lorat(cfg.model, write_dinov2(cfg, tmp_path / "d.pth")).eval()
    inputs = random_inputs(cfg)
    path = save_model(model, cfg, tmp_path / "m.safetensors")
    assert any(".lora_A." in k for k in model.state_dict())  # the training model is untouched
    loaded, _ = load_model(path)
    torch.testing.assert_close(_out(loaded, inputs)["boxes"], _out(model, inputs)["boxes"], atol=1e-5, rtol=0)


def test_merged_state_dict_file(official, tmp_path, tiny_config):
    model, cfg, ref = official
    torch.save(model.state_dict(), tmp_path / "merged.pth")
    again, _ = load_model(tmp_path / "merged.pth", tiny_config)
    torch.testing.assert_close(_out(again, _ref_inputs(ref))["score_map"], ref["score_map"], atol=1e-4, rtol=0)
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    wrapped, _ = load_model(tmp_path / "wrapped.pth", tiny_config)
    torch.testing.assert_close(_out(wrapped, _ref_inputs(ref))["score_map"], ref["score_map"], atol=1e-4, rtol=0)


def test_official_full_unmerged_state_dict(tiny_config, tiny_files, tmp_path):
    """The official in-memory training state dict (380 entries for B-224), lora_alpha included."""
    model = build_lorat(tiny_config.model, tiny_files["backbone"])
    from lorat.checkpoint.build import load_official_trainable

    load_official_trainable(model, load_file(tiny_files["trainable"]), tiny_files["trainable"])
    sd = peft_to_official_keys(model.state_dict(), swiglu=False)
    assert "blocks.0.attn.qkv.q.linear.weight" in sd and "blocks.0.mlp.fc1.lora.B" in sd
    sd["lora_alpha"] = torch.tensor(8)
    sd["use_rslora"] = torch.tensor(False)
    save_file(sd, tmp_path / "full.safetensors")
    loaded, _ = load_model(tmp_path / "full.safetensors", tiny_config)
    ref = load_file(tiny_files["forward"])
    torch.testing.assert_close(_out(loaded, _ref_inputs(ref))["score_map"], ref["score_map"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_timm_and_chunked_dinov2_files(ffn, tmp_path):
    """The same backbone as a DINOv2 release file, timm safetensors, and chunked blocks."""
    cfg = tiny_config(ffn=ffn, depth=4)
    release = write_dinov2(cfg, tmp_path / "release.pth")
    sd = torch.load(release, weights_only=True)
    timm_sd = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v
               for k, v in sd.items() if k != "mask_token"}
    save_file(timm_sd, tmp_path / "timm.safetensors")
    chunked = {}
    for k, v in sd.items():  # DINOv2 block_chunks=2: blocks.{chunk}.{index}.
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        chunked[k] = v
    torch.save(chunked, tmp_path / "chunked.pth")
    models = []
    for path in ("release.pth", "timm.safetensors", "chunked.pth"):
        m = build_lorat(cfg.model, lora=False)
        load_backbone(m, tmp_path / path)
        models.append(m.state_dict())
    for other in models[1:]:
        for k in models[0]:
            if k != "token_type_embed" and not k.startswith("head."):
                assert torch.equal(models[0][k], other[k]), k


# ----------------------------------------------------------------------------- bad files


def test_missing_and_corrupt_files(tmp_path, tiny_config, tiny_files):
    with pytest.raises(WeightsError, match="not found: .*nope.safetensors"):
        load_model(tmp_path / "nope.safetensors", tiny_config)
    data = tiny_files["trainable"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut.safetensors: .*truncated or corrupt"):
        load_model(tmp_path / "cut.safetensors", tiny_config, tiny_files["backbone"])
    data = tiny_files["backbone"].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match=r"cut.pth: .*truncated or corrupt"):
        load_model(tiny_files["trainable"], tiny_config, tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_weights(tmp_path / "empty.pth")
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint\n")
    with pytest.raises(WeightsError, match="text.pth"):
        read_weights(tmp_path / "text.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_arbitrary_pickles(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    torch.save({"w": torch.zeros(1), "obj": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(WeightsError, match=f"{name}: .*refusing to unpickle"):
            read_weights(tmp_path / name)
    assert "pwned" not in capsys.readouterr().out


def _cfg(variant, embed_dim=96, depth=2, r=8):
    return config_from_dict({"model": {"variant": variant, "lora": {"r": r, "alpha": r},
                                       "backbone": {"embed_dim": embed_dim, "depth": depth, "num_heads": 2}}})


def test_other_variant_names_file_variant_and_keys(tmp_path, tiny_files):
    wide = _cfg("wide-test", embed_dim=64)
    with pytest.raises(WeightsError) as err:
        load_model(tiny_files["trainable"], wide, tiny_files["backbone"])
    msg = str(err.value)
    assert "dinov2_backbone.pth" in msg and "wide-test" in msg and "embed_dim 96" in msg
    deep = _cfg("deep-test", depth=3)
    with pytest.raises(WeightsError, match=r"DINOv2 backbone does not fit model deep-test: missing keys: "
                                           r"blocks\.2\.norm1\.weight"):
        load_model(tiny_files["trainable"], deep, tiny_files["backbone"])
    rank = _cfg("rank-test", r=16)
    with pytest.raises(WeightsError, match=r"lorat_trainable.safetensors: official LoRAT checkpoint does not fit "
                                           r"model rank-test: wrong shapes: blocks\.0\..*LoRA rank 8"):
        load_model(tiny_files["trainable"], rank, tiny_files["backbone"])


def test_missing_keys_in_official_checkpoint(tmp_path, tiny_config, tiny_files):
    sd = load_file(tiny_files["trainable"])
    del sd["head.cls_mlp.layers.2.bias"]
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"partial.safetensors: .*official-tiny: missing keys: "
                                           r"head\.cls_mlp\.layers\.2\.bias"):
        load_model(tmp_path / "partial.safetensors", tiny_config, tiny_files["backbone"])


def test_wrong_roles(tiny_config, tiny_files, tmp_path):
    with pytest.raises(WeightsError, match="needs the DINOv2 backbone file too"):
        load_model(tiny_files["trainable"], tiny_config)
    with pytest.raises(WeightsError, match="is a DINOv2 backbone file, not a LoRAT model"):
        load_model(tiny_files["backbone"], tiny_config)
    with pytest.raises(WeightsError, match="expected a DINOv2 backbone file"):
        load_model(tiny_files["trainable"], tiny_config, tiny_files["trainable"])
    save_file({"foo": torch.zeros(2)}, tmp_path / "foo.safetensors")
    with pytest.raises(WeightsError, match="not a LoRAT or DINOv2 weight file"):
        load_model(tmp_path / "foo.safetensors", tiny_config)
    with pytest.raises(WeightsError, match="without an embedded config"):
        load_model(tiny_files["trainable"], None, tiny_files["backbone"])


def test_single_file_with_mismatching_config(official, tmp_path):
    model, cfg, _ = official
    path = save_model(model, cfg, tmp_path / "one.safetensors")
    other = config_from_dict(config_to_dict(cfg) | {"model": config_to_dict(cfg)["model"] | {"search_size": 252}})
    with pytest.raises(WeightsError, match="search_size"):
        load_model(path, other)
    tweaked = config_from_dict(config_to_dict(cfg) | {"tracking": {"window_penalty": 0.3}})
    _, used = load_model(path, tweaked)
    assert used.tracking.window_penalty == 0.3  # tracking settings may differ


def test_register_dinov2_rejected(tmp_path):
    cfg = tiny_config()
    sd = torch.load(write_dinov2(cfg, tmp_path / "d.pth"), weights_only=True)
    sd["register_tokens"] = torch.zeros(1, 4, 48)
    torch.save(sd, tmp_path / "reg.pth")
    with pytest.raises(WeightsError, match="register tokens"):
        build_lorat(cfg.model, tmp_path / "reg.pth")


def test_official_trainable_roundtrip(tmp_path):
    cfg = tiny_config(ffn="swiglu")
    dinov2 = write_dinov2(cfg, tmp_path / "d.pth")
    model = build_lorat(cfg.model, dinov2).eval()
    save_file(official_trainable(model, swiglu=True), tmp_path / "official.safetensors")
    assert "blocks.0.mlp.w12.lora.A" in load_file(tmp_path / "official.safetensors")
    loaded, _ = load_model(tmp_path / "official.safetensors", cfg, dinov2)
    inputs = random_inputs(cfg)
    torch.testing.assert_close(_out(loaded, inputs)["boxes"], _out(model, inputs)["boxes"], atol=1e-5, rtol=0)

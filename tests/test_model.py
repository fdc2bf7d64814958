import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorat.checkpoint.build import build_lorat, load_official_trainable
from lorat.checkpoint.loader import load_model
from lorat.config import load_config
from lorat.info import model_summary
from lorat.model.lora import SplitQKV, has_lora, merge_lora
from lorat.model.vit import LoRAT, resample_pos_embed

from .conftest import ROOT
from .helpers import official_trainable, random_inputs, tiny_config, write_dinov2


def _run(model, z, x, mask):
    with torch.no_grad():
        return model(z, x, mask)


def test_official_fixture_forward(tiny_config, tiny_files):
    """DINOv2 release file + official trainable checkpoint reproduce the official outputs."""
    model, _ = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    ref = load_file(tiny_files["forward"])
    out = _run(model, ref["z"], ref["x"], ref["z_feat_mask"])
    assert out["score_map"].dtype == torch.float32 and out["score_map"].shape == ref["score_map"].shape
    torch.testing.assert_close(out["score_map"], ref["score_map"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-4, rtol=0)


def test_unmerged_matches_merged_and_fixture(tiny_config, tiny_files):
    model = build_lorat(tiny_config.model, tiny_files["backbone"])
    load_official_trainable(model, load_file(tiny_files["trainable"]), tiny_files["trainable"])
    ref = load_file(tiny_files["forward"])
    model.eval()
    unmerged = _run(model, ref["z"], ref["x"], ref["z_feat_mask"])
    torch.testing.assert_close(unmerged["score_map"], ref["score_map"], atol=1e-4, rtol=0)
    merge_lora(model)
    assert not has_lora(model)
    assert all(isinstance(b.attn.qkv, nn.Linear) for b in model.blocks)  # one fused matmul again
    merged = _run(model, ref["z"], ref["x"], ref["z_feat_mask"])
    for key in ("score_map", "boxes"):
        torch.testing.assert_close(merged[key], unmerged[key], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_merge_equivalence_random(ffn, tmp_path):
    cfg = tiny_config(ffn=ffn)
    model = build_lorat(cfg.model, write_dinov2(cfg, tmp_path / "dinov2.pth"))
    model.eval()
    inputs = random_inputs(cfg)
    before = _run(model, *inputs)
    merged = merge_lora(copy.deepcopy(model))
    after = _run(merged, *inputs)
    torch.testing.assert_close(after["score_map"], before["score_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(after["boxes"], before["boxes"], atol=1e-5, rtol=0)
    # The official B is not zero: the merged weights already differ from DINOv2 at step 0.
    plain = build_lorat(cfg.model, tmp_path / "dinov2.pth", lora=False)
    delta = merged.blocks[0].mlp.fc1.weight - plain.blocks[0].mlp.fc1.weight
    expected = 2.0 * 4**0.5 * 0.02**2  # s * sqrt(r) * std(A) * std(B), s = alpha / r = 2
    assert 0.5 * expected < delta.std() < 2 * expected


def test_merged_state_dict_layout(tiny_config, tiny_files):
    model, _ = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    sd = model.state_dict()
    depth = tiny_config.model.backbone.depth
    assert len(sd) == 4 + 14 * depth + 2 + 12  # Appendix A.3 (186 for B-224)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * 96, 96)
    assert sd["pos_embed"].shape == (1, 256, 96)


@pytest.mark.parametrize("name, trainable", [("s224", 5_902_853), ("b224", 12_985_349),
                                             ("l378", 32_518_149), ("g224", 80_234_501),
                                             ("g378", 80_234_501)])
def test_trainable_counts_on_meta(name, trainable):
    summary = model_summary(load_config(ROOT / "configs" / f"{name}.yaml"))
    assert summary["parameters"]["trainable"] == trainable


def test_official_trainable_key_count():
    cfg = load_config(ROOT / "configs" / "b224.yaml")
    with torch.device("meta"):
        model = build_lorat(cfg.model, device="meta")
    assert len(official_trainable(model)) == 157
    g = load_config(ROOT / "configs" / "g378.yaml")
    keys = official_trainable(build_lorat(g.model, device="meta"), swiglu=True)
    assert len(keys) == 493 and keys["blocks.0.mlp.w12.lora.B"].shape == (8192, 64)


def test_frozen_split(tiny_config):
    model = build_lorat(tiny_config.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "token_type_embed" in trainable and "head.cls_mlp.layers.2.weight" in trainable
    assert not any(n.startswith(("pos_embed", "patch_embed", "norm.")) for n in trainable)
    assert all(".lora_" in n for n in trainable if n.startswith("blocks."))
    assert isinstance(model.blocks[0].attn.qkv, SplitQKV)


def test_pos_embed_resample_and_template_subgrid():
    pe = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(pe, (27, 27))
    assert out.shape == (1, 729, 8)
    same = resample_pos_embed(pe, (37, 37))  # bicubic to the same size is the identity
    torch.testing.assert_close(same, pe[:, 1:], atol=1e-5, rtol=0)
    cfg = tiny_config()
    model = LoRAT(cfg.model)
    model.pos_embed.data.copy_(torch.arange(256.0).view(1, 256, 1).expand(1, 256, 48))
    sub = model.template_pos_embed()[0, :, 0].view(8, 8)
    assert sub[0].tolist() == list(range(8)) and sub[1, 0] == 16  # rows of the 16x16 grid


def test_378_style_grid_and_rectangles(tmp_path):
    from lorat.config import config_from_dict

    cfg = config_from_dict({"model": {"backbone": {"embed_dim": 32, "depth": 1, "num_heads": 2},
                                      "template_size": [196, 98], "search_size": [378, 252],
                                      "lora": {"r": 2, "alpha": 2}}})
    model = build_lorat(cfg.model, write_dinov2(cfg, tmp_path / "d.pth")).eval()
    out = _run(model, *random_inputs(cfg))
    assert out["score_map"].shape == (2, 18, 27) and out["boxes"].shape == (2, 18, 27, 4)
    centres = (out["boxes"][..., :2] + out["boxes"][..., 2:]) / 2
    assert centres[0, 0, 0, 0] < 1 / 27 * 1.0 + 1 / 54 + 1e-6


def test_subset_drop_path_trains(tmp_path):
    cfg = tiny_config(drop_path=0.4)
    model = build_lorat(cfg.model).train()
    out = model(*random_inputs(cfg, batch=4))
    (out["score_map"].sum() + out["boxes"].sum()).backward()
    assert model.head.cls_mlp.layers[0].weight.grad is not None
    model.eval()
    a, b = _run(model, *random_inputs(cfg)), _run(model, *random_inputs(cfg))
    assert torch.equal(a["score_map"], b["score_map"])


def test_device_dtype_agnostic(tiny_config, tiny_files):
    model, _ = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"],
                          dtype=torch.bfloat16)
    ref = load_file(tiny_files["forward"])
    out = _run(model, ref["z"].bfloat16(), ref["x"].bfloat16(), ref["z_feat_mask"])
    assert out["score_map"].dtype == torch.float32  # head output is always float32
    assert (out["score_map"] - ref["score_map"]).abs().max() < 0.05


def test_wrong_input_size_is_explained(tiny_config, tiny_files):
    model, _ = load_model(tiny_files["trainable"], tiny_config, tiny_files["backbone"])
    with pytest.raises(ValueError, match="expected template 112x112"):
        model(torch.zeros(1, 3, 128, 128), torch.zeros(1, 3, 224, 224), torch.zeros(1, 8, 8, dtype=torch.long))




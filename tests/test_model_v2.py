"""LoRATv2 network against the official code's outputs (bench/loratv2_reference.py, tiny random weights)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lorat.checkpoint.keys import merge_official_v2
from lorat.config import BackboneConfig
from lorat.model.v2 import LoRATv2

from .conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "official-v2-tiny"


def _case(name: str):
    case = json.loads((FIXTURES / name / "case.json").read_text())
    cfg = BackboneConfig(embed_dim=case["embed_dim"], depth=case["depth"], num_heads=case["num_heads"],
                         mlp_ratio=case["mlp_ratio"])
    model = LoRATv2(cfg, case["template"], case["search"], case["register_tokens"],
                    owned=[True] * (1 + len(case["search"]))).eval()
    state = merge_official_v2(load_file(str(FIXTURES / name / "official.safetensors")), case["lora_alpha"])
    model.load_state_dict(state, strict=True)
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    xs = [io[f"x{i}"] for i in range(len(case["search"]))]
    return model, io, xs


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_training_forward_equals_the_official(name):
    model, io, xs = _case(name)
    with torch.no_grad():
        out = model(io["z"], io["z_feat_mask"], xs)
    torch.testing.assert_close(out["score_map"], io["train_score_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"], io["train_boxes"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_kv_cached_steps_equal_the_official_and_the_full_forward(name):
    model, io, xs = _case(name)
    with torch.no_grad():
        full = model(io["z"], io["z_feat_mask"], xs)
        cache = model.new_cache(len(io["z"]))
        model.prefill_template(io["z"], io["z_feat_mask"], cache)
        for index, x in enumerate(xs[:-1]):
            model.prefill(x, index, cache)
        cached = model.track(xs[-1], cache)
        again = model.track(xs[-1], cache)  # a track step leaves the cached chunks as they were
    for key in ("score_map", "boxes"):
        torch.testing.assert_close(cached[key], io[f"cached_{key}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(cached[key], full[key], atol=1e-6, rtol=0)
        assert torch.equal(cached[key], again[key])


def test_cache_rows_serve_each_sequence_separately():
    model, io, xs = _case("phase2")
    with torch.no_grad():
        cache = model.new_cache(3)
        rows = torch.tensor([2, 0])  # sequence 0 -> row 2, sequence 1 -> row 0; row 1 unused
        model.prefill_template(io["z"], io["z_feat_mask"], cache, rows)
        model.prefill(xs[0], 0, cache, rows)
        one = model.track(xs[1][1:], cache, rows[1:])
    torch.testing.assert_close(one["score_map"], io["cached_score_map"][1:], atol=1e-5, rtol=0)


def test_streams_that_train_share_the_backbone_tensors():
    cfg = BackboneConfig(embed_dim=32, depth=1, num_heads=2)
    model = LoRATv2(cfg, (56, 56), [(56, 56), (84, 84)], owned=[True, False, False])
    attn = model.blocks[0].attn
    assert attn.qkv[1].weight is attn.qkv[2].weight and attn.qkv[0].weight is not attn.qkv[1].weight
    assert model.chunk_sizes() == [4 + 16, 16, 36]
    with pytest.raises(ValueError, match="search region 1 expects 84x84"):
        model(torch.zeros(1, 3, 56, 56), torch.zeros(1, 4, 4, dtype=torch.long),
              [torch.zeros(1, 3, 56, 56), torch.zeros(1, 3, 56, 56)])

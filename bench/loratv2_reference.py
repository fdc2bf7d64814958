"""Write reference outputs of the official LoRATv2 code (small random weights) for our tests.

    python bench/loratv2_reference.py --official /path/to/LoRAT --out tests/fixtures/official-v2-tiny

``--official`` is a checkout of https://github.com/LitingLin/LoRAT (its ``trackit`` package is
imported from there; nothing of it is copied here). For each case (phase 1: template + one search
stream, both training; phase 2: template and reference streams frozen, a third stream training,
crops of three sizes) the script builds the official ``LoRATv2`` on a tiny timm DINOv2 with four
register tokens, perturbs every tensor, and writes into ``OUT/<case>/``:

* ``official.safetensors``: the official training model's state dict (LoRA unmerged);
* ``io.safetensors``: inputs (``z``, ``z_feat_mask``, ``x0``, ``x1``, ...) and outputs:
  ``train_score_map`` / ``train_boxes`` (the training forward), ``cached_score_map`` /
  ``cached_boxes`` (the official inference build, merged on load, through its KV-cached
  ``init`` / ``update`` / ``track`` steps);
* ``case.json``: the shapes (embed_dim, depth, heads, crop sizes, LoRA rank and alpha) and the
  training build's parameter counts (trainable and total).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CASES = {
    "phase1": {"template": [112, 112], "search": [[112, 112]], "trainable": [True, True]},
    "phase2": {"template": [112, 112], "search": [[112, 112], [182, 154]], "trainable": [False, False, True]},
}
SHAPE = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "register_tokens": 4, "lora_r": 8,
         "lora_alpha": 8.0, "timm_model": "vit_small_patch14_reg4_dinov2"}


def _build(official_cls, timm, case: dict, trainable, seed: int):
    import torch

    torch.manual_seed(seed)
    vit = timm.create_model(SHAPE["timm_model"], pretrained=False, embed_dim=SHAPE["embed_dim"],
                            depth=SHAPE["depth"], num_heads=SHAPE["num_heads"])
    return official_cls(vit, 14, tuple(case["template"]), tuple(tuple(s) for s in case["search"]), False, True,
                        tuple(trainable), SHAPE["lora_r"], SHAPE["lora_alpha"], 0.0, False).eval()


def write_case(name: str, case: dict, out: Path, official: Path, seed: int = 0) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(official))
    from trackit.models.methods.LoRATv2.model import LoRATv2 as Official

    train = _build(Official, timm, case, case["trainable"], seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in train.parameters():  # every tensor away from its initial value, LoRA B included
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    # streams that train share one base layer: its tensors appear under each stream's keys, as in
    # the trainer's state dict; cloned, since safetensors stores no shared tensors
    state = {k: v.detach().clone().contiguous() for k, v in train.state_dict().items()}
    batch = 2
    tw, th = case["template"]
    z = torch.randn(batch, 3, th, tw, generator=g)
    mask = (torch.rand(batch, th // 14, tw // 14, generator=g) > 0.5).long()
    xs = [torch.randn(batch, 3, h, w, generator=g) for w, h in case["search"]]
    with torch.no_grad():
        trained = train("train", [z], xs, mask)
        inference = _build(Official, timm, case, [False] * len(case["trainable"]), seed + 7)
        inference.load_state_dict(train.state_dict())  # its hooks merge the LoRA pairs
        caches = tuple((torch.zeros(s), torch.zeros(s)) for s in inference.get_kv_cache_shapes(batch))
        rows = torch.arange(batch, dtype=torch.int32)
        inference("init", z, mask, caches, rows)
        for index in range(len(xs) - 1):
            inference("update", index, xs[index], caches, rows)
        cached = inference("track", len(xs) - 1, xs[-1], caches, rows)
    io = {"z": z, "z_feat_mask": mask, **{f"x{i}": x for i, x in enumerate(xs)},
          "train_score_map": trained["score_map"], "train_boxes": trained["boxes"],
          "cached_score_map": cached["score_map"], "cached_boxes": cached["boxes"]}
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "official.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))
    counts = {"trainable_params": sum(p.numel() for p in train.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in train.parameters())}
    (folder / "case.json").write_text(json.dumps({**SHAPE, **case, **counts, "seed": seed}, indent=1) + "\n")
    print(f"{name}: {len(state)} tensors, outputs {tuple(cached['score_map'].shape)} -> {folder}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="checkout of LitingLin/LoRAT")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not (args.official / "trackit" / "models" / "methods" / "LoRATv2").is_dir():
        print(f"error: {args.official} is not a checkout of LitingLin/LoRAT with LoRATv2", file=sys.stderr)
        return 2
    for name, case in CASES.items():
        write_case(name, case, args.out, args.official)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

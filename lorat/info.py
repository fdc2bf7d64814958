"""``python -m lorat.info CONFIG [--weights FILE] [--backbone-weights FILE]``: JSON model summary.

Prints parameter counts (training build as ``train.finetune`` says: total, trainable, frozen;
merged inference model), token counts and grids, and, when weights are given, which files were loaded and as
what. Counting builds the model on the meta device, so even ViT-g costs no memory.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from lorat.checkpoint.build import build_lorat, build_training_model
from lorat.checkpoint.files import load_state_for_info
from lorat.checkpoint.loader import load
from lorat.config import Config, load_config
from lorat.errors import LoratError, run_cli
from lorat.options import FILE_OPTIONS, ModelOptions, add_model_arguments

__all__ = ["main", "model_summary"]


def model_summary(config: Config) -> dict[str, Any]:
    """Parameter and token counts of a config, computed without allocating weights."""
    cfg = config.model
    train = build_training_model(config, device="meta")
    plain = build_lorat(cfg, lora=False, device="meta")
    total = sum(p.numel() for p in train.parameters())
    trainable = sum(p.numel() for p in train.parameters() if p.requires_grad)
    hz, wz = cfg.template_grid
    hx, wx = cfg.search_grid
    summary = {
        "variant": cfg.variant,
        "backbone": {"embed_dim": cfg.backbone.embed_dim, "depth": cfg.backbone.depth,
                     "num_heads": cfg.backbone.num_heads, "ffn": cfg.backbone.ffn, "stem": cfg.backbone.stem},
        "finetune": config.train.finetune,
        "parameters": {"total": total, "trainable": trainable, "frozen": total - trainable,
                       "inference": sum(p.numel() for p in plain.parameters())},
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha} if config.train.finetune == "lora" else None,
        "tokens": {"template": hz * wz, "search": hx * wx, "total": hz * wz + hx * wx,
                   "template_grid": [hz, wz], "search_grid": [hx, wx]},
        "crops_px": {"template": list(cfg.template_size), "search": list(cfg.search_size)},
        "tracking": {"template_area_factor": config.tracking.template_area_factor,
                     "search_area_factor": config.tracking.search_area_factor},
    }
    if cfg.family == "loratv2":  # chunks: registers + template, [reference], search; only the last runs per frame
        p = cfg.backbone.patch_size
        reference = (cfg.reference_size[0] // p) * (cfg.reference_size[1] // p) if cfg.reference_size else 0
        summary["family"] = "loratv2"
        summary["tokens"] |= {"registers": cfg.register_tokens, "reference": reference,
                              "total": cfg.register_tokens + hz * wz + reference + hx * wx, "per_frame": hx * wx}
        if cfg.reference_size:
            summary["crops_px"]["reference"] = list(cfg.reference_size)
            summary["tracking"] |= {"reference_area_factor": config.tracking.reference_area_factor,
                                    "reference_threshold": config.tracking.reference_threshold}
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorat.info", description=__doc__.split("\n")[0])
    add_model_arguments(parser, FILE_OPTIONS, config_positional=True)
    args = parser.parse_args(argv)
    options = ModelOptions.from_args(args, device="cpu", dtype="float32", backend="torch")
    if options.config is None and options.weights is None:
        parser.error("give a CONFIG, or --weights with one of our single files")

    config = load_config(options.config) if options.config else None
    files = []
    if options.weights:
        loaded = load(options, say=None)
        model, config = loaded.model, loaded.config
        for role, path in (("weights", loaded.weights), ("backbone_weights", loaded.backbone_weights)):
            if path:
                fmt, n = load_state_for_info(path)
                files.append({"role": role, "path": str(path), "format": fmt, "tensors": n})
        loaded_params = sum(p.numel() for p in model.parameters())
    elif options.backbone_weights:
        raise LoratError("--backbone-weights needs --weights (the LoRAT checkpoint)")
    assert config is not None
    summary = model_summary(config)
    if files:
        summary["loaded"] = {"files": files, "parameters": loaded_params,
                             "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

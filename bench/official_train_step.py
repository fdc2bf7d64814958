"""Training step speed: this project's default against the official implementation, alternating runs.

    python bench/official_train_step.py --official /path/to/LoRAT --config b224 --batch 4 --rounds 3

``--official`` is a checkout of https://github.com/LitingLin/LoRAT (not vendored, not installed:
its ``trackit`` package is imported from that folder). Each round runs, each in a fresh process,
``python -m lorat.bench CONFIG --train`` (our defaults on the device; ``--ours-args`` adds options,
e.g. ``"--amp none"``) and the official model's step: its ``LoRAT_DINOv2`` on a randomly initialised
DINOv2 of the same size (``build_dino_v2_backbone``), its backbone freeze and its LoRA layers
(``enable_lora_``, r and alpha from the config), AdamW over the trainable parameters, global-norm
clipping 1.0; float32 as the official code trains on a CPU, or with ``--official-amp float16``
(grad scaler) and ``--official-compile``, its recipe on a GPU (``--device cuda``). Its outputs go through this
project's loss, which reproduces the official one (``tests/test_train.py``) and is a negligible part
of a step. Both sides time the same number of steps after 3 untimed ones on the same batch shapes.
Prints a Markdown table of medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lorat.options import add_model_arguments

_VIT_NAMES = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14", 1536: "ViT-g/14"}


def _official_step(official: Path, config_name: str, batch: int, steps: int, device: str = "cpu",
                   amp: str = "none", compiled: bool = False) -> dict:
    """The official model's training step, timed in this process."""
    from contextlib import nullcontext

    import torch

    from lorat.config import load_config
    from lorat.runtime import dtype_name, synchronize
    from lorat.training.loss import lorat_loss
    from lorat.training.speed import synthetic_batch

    sys.path.insert(0, str(official))
    from trackit.models.backbone.dinov2.builder import build_dino_v2_backbone
    from trackit.models.methods.LoRAT.funcs.vit_backbone_freeze import freeze_vit_backbone_
    from trackit.models.methods.LoRAT.funcs.vit_lora_utils import enable_lora_
    from trackit.models.methods.LoRAT.lorat import LoRAT_DINOv2

    config = load_config(config_name)
    m = config.model
    torch.manual_seed(0)
    target = torch.device(device)
    vit = build_dino_v2_backbone(load_pretrained=False, name=_VIT_NAMES[m.backbone.embed_dim], acc="default")
    model = LoRAT_DINOv2(vit, m.template_grid[::-1], m.search_grid[::-1])  # official sizes are (W, H)
    freeze_vit_backbone_(model)
    enable_lora_(model, m.lora.r, m.lora.alpha, 0.0, False)
    model = model.to(target).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    dtype = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[amp]
    scaler = torch.amp.GradScaler(target.type, enabled=dtype == torch.float16)
    autocast = (lambda: torch.autocast(target.type, dtype=dtype)) if dtype else nullcontext
    net = torch.compile(model) if compiled else model
    data = synthetic_batch(config, batch, target)
    num_pos = data["positive"].sum().float()

    def step() -> float:
        with autocast():
            out = net(data["z"], data["x"], data["z_feat_mask"])
            loss = lorat_loss({"score_map": out["score_map"], "boxes": out["boxes"]}, data["target_box"],
                              data["positive"], num_pos)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(3):
        step()
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    synchronize(target)
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(target)
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated(target) / 2**20 if target.type == "cuda" else float("nan")
    return {"samples_per_s": batch / seconds, "step_ms": seconds * 1000, "dtype": dtype_name(dtype), "loss": loss,
            "trainable": sum(p.numel() for p in params), "peak_mb": peak, "compile": compiled}


def _run(command: list[str]) -> dict:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="a checkout of LitingLin/LoRAT")
    add_model_arguments(parser, ("config", "device"), config={"default": "b224"})  # device: both sides
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after 3 untimed ones)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side")
    parser.add_argument("--ours-args", default="", help="extra lorat.bench options for our side")
    parser.add_argument("--official-amp", choices=("none", "float16", "bfloat16"), default="none",
                        help="the official side's autocast (its GPU recipe: float16)")
    parser.add_argument("--official-compile", action="store_true", help="torch.compile the official model")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.official / "trackit" / "models" / "methods" / "LoRAT" / "lorat.py").is_file():
        parser.error(f"--official {args.official}: not a checkout of LitingLin/LoRAT (no trackit/models/methods/LoRAT)")
    from lorat.runtime import resolve_device

    args.device = str(resolve_device(args.device))
    if args.worker:
        print(json.dumps(_official_step(args.official, args.config, args.batch, args.steps, args.device,
                                        args.official_amp, args.official_compile)))
        return 0
    ours_cmd = [sys.executable, "-m", "lorat.bench", args.config, "--train", "--batch", str(args.batch),
                "--steps", str(args.steps), "--device", args.device, *shlex.split(args.ours_args)]
    theirs_cmd = [sys.executable, __file__, "--worker", "--official", str(args.official), "--config", args.config,
                  "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device,
                  "--official-amp", args.official_amp, *(["--official-compile"] if args.official_compile else [])]
    runs: dict[str, list[dict]] = {"ours": [], "official": []}
    for round_ in range(args.rounds):
        for side, command in (("ours", ours_cmd), ("official", theirs_cmd)):
            runs[side].append(_run(command))
            print(f"round {round_ + 1}: {side} {runs[side][-1]['samples_per_s']:.3f} samples/s "
                  f"({runs[side][-1]['dtype']})", file=sys.stderr, flush=True)
    median = {side: statistics.median(r["samples_per_s"] for r in results) for side, results in runs.items()}
    print(f"| side | dtype | trainable | samples/s (median of {args.rounds}) | step ms | runs |")
    print("|---|---|---|---|---|---|")
    for side, results in runs.items():
        values = ", ".join(f"{r['samples_per_s']:.3f}" for r in results)
        print(f"| {side} | {results[0]['dtype']} | {results[0]['trainable']:,} | {median[side]:.3f} | "
              f"{args.batch / median[side] * 1000:.0f} | {values} |")
    print(f"\nours / official: {median['ours'] / median['official']:.2f}x ({args.config}, batch {args.batch})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

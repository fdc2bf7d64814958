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
  training build's parameter counts (trainable and total);
* ``trajectory.txt``: one ``x,y,w,h,score`` line per frame of a generated 24-frame clip
  (``tests/helpers.py``'s textured square, saved as ``frames.npz``), tracked from the first box with
  the official evaluation's pieces in its order: ``get_siamfc_cropping_params`` /
  ``apply_siamfc_cropping`` (the eval transform's template crop and the pipeline's search crop,
  padded with the template frame's mean), ``SiamFCCroppingParameterProvider`` (min size 10),
  ``get_foreground_bounding_box``, the model's ``init`` / ``update`` / ``track``,
  ``PostProcessing_BoxWithScoreMap`` and ``siamfc_post_process``. Phase 2 replaces the reference
  frame when the score exceeds ``REFERENCE_THRESHOLD`` (0.9 in the official configs; lower here so
  that random weights exercise it).

Two places of the official LoRATv2 evaluation (``pipelines/LoRATv2/builder.py``, ``phase_2.py``)
cannot run as written, and the loop here does what they evidently mean: the template feature map is
``template_size // 14`` (the builder multiplies), and phase 2 tracks with the last stream (index 1,
the search region) and writes the reference frame into stream 1's slot (index 0), as training
orders them (the pipeline swaps the two indices and passes the reference cache tensor, not its size,
to the crop-parameter provider).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

CASES = {
    "phase1": {"template": [112, 112], "search": [[112, 112]], "trainable": [True, True]},
    "phase2": {"template": [112, 112], "search": [[112, 112], [182, 154]], "trainable": [False, False, True]},
}
REFERENCE_THRESHOLD = 0.479
FROZEN_REPLICA = re.compile(r"\.(qkv|proj|fc1|fc2)\.\d+\.(weight|bias)$")  # a frozen stream's own layer
TRACKING = {"template_factor": 2.0, "search_factor": 4.0, "reference_factor": 4.0, "min_object_size": 10,
            "window_penalty": 0.45}
SHAPE = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "register_tokens": 4, "lora_r": 8,
         "lora_alpha": 8.0, "timm_model": "vit_small_patch14_reg4_dinov2"}


def _build(official_cls, timm, case: dict, trainable, seed: int, generator=None):
    """The official model on a tiny random timm backbone (``generator``: perturb the backbone first, so
    its LayerScale and every weight matter, and every stream's copy starts from the same values)."""
    import torch

    torch.manual_seed(seed)
    vit = timm.create_model(SHAPE["timm_model"], pretrained=False, embed_dim=SHAPE["embed_dim"],
                            depth=SHAPE["depth"], num_heads=SHAPE["num_heads"])
    if generator is not None:
        with torch.no_grad():
            for param in vit.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return official_cls(vit, 14, tuple(case["template"]), tuple(tuple(s) for s in case["search"]), False, True,
                        tuple(trainable), SHAPE["lora_r"], SHAPE["lora_alpha"], 0.0, False).eval()


def write_case(name: str, case: dict, out: Path, official: Path, seed: int = 0) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(official))
    from trackit.models.methods.LoRATv2.model import LoRATv2 as Official

    g = torch.Generator().manual_seed(seed + 1)
    train = _build(Official, timm, case, case["trainable"], seed, g)
    with torch.no_grad():
        # what training changes: the trainable tensors (LoRA B included, away from its init) and, as
        # phase 1 left them, the frozen streams' merged layers and heads; the backbone stays as built
        for key, param in train.named_parameters():
            if param.requires_grad or key.startswith("heads.") or FROZEN_REPLICA.search(key):
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        for head in train.heads:  # boxes about as large as the target (a random head's drift), not 4x per frame
            head.reg_mlp.layers[-1].bias.add_(-1.95)
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
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import textured_clip

    frames, boxes = textured_clip(24, seed=seed + 3)
    x0, y0, w0, h0 = boxes[0]
    first = np.array([x0, y0, x0 + w0, y0 + h0], dtype=np.float64)
    trajectory = _track(official, inference, case, np.stack(frames), first)
    io = {"z": z, "z_feat_mask": mask, **{f"x{i}": x for i, x in enumerate(xs)},
          "train_score_map": trained["score_map"], "train_boxes": trained["boxes"],
          "cached_score_map": cached["score_map"], "cached_boxes": cached["boxes"],
          **_labels_and_loss(case, trained)}
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "official.safetensors"))
    save_file({k: v.contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))
    np.savez_compressed(folder / "frames.npz", frames=np.stack(frames))
    np.savetxt(folder / "trajectory.txt", np.array(trajectory), fmt="%.6f", delimiter=",")
    counts = {"trainable_params": sum(p.numel() for p in train.parameters() if p.requires_grad),
              "total_params": sum(p.numel() for p in train.parameters())}
    settings = {**SHAPE, **case, **counts, "seed": seed, "tracking": TRACKING,
                "reference_threshold": REFERENCE_THRESHOLD}
    (folder / "case.json").write_text(json.dumps(settings, indent=1) + "\n")
    print(f"{name}: {len(state)} tensors, outputs {tuple(cached['score_map'].shape)} -> {folder}")


def _official_label_generation(trackit: Path):
    """The official ``LoRATv1_label_gen`` plugin module, loaded from its file alone: importing it through
    its package would pull in the whole data pipeline (JPEG and EXIF readers); its relative import
    needs only two base-class names from the plugin package, given here as placeholders."""
    import importlib.util
    import types

    parent = types.ModuleType("_official_plugin")
    parent.__path__ = []
    parent.ExtraTransform = parent.TemporalTrackerTrainingSample = object
    sys.modules["_official_plugin"] = parent
    path = trackit / "data/methods/LoRATv2_train/transform/default/plugin/LoRATv1_label_gen/__init__.py"
    spec = importlib.util.spec_from_file_location("_official_plugin.labels", path, submodule_search_locations=[])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labels_and_loss(case: dict, trained: dict) -> dict:
    """The official training labels (``LoRATv1_label_gen``: positive cells and the normalised box) of
    fixed target boxes in the last search crop, and the official criterion (``box_with_score_map``:
    IoU-aware BCE + GIoU, weights 1, as every LoRATv2 config sets it) on the training forward."""
    import numpy as np
    import torch
    from trackit.criteria.methods.box_with_score_map import SimpleCriteria
    from trackit.criteria.modules.iou_loss import GIoULoss

    labels_module = _official_label_generation(Path(sys.modules["trackit"].__file__).parent)
    label_assignment, _box_with_score_map_label_collator = (labels_module.label_assignment,
                                                            labels_module._box_with_score_map_label_collator)

    w, h = case["search"][-1]
    grid = (w // 14, h // 14)
    boxes = np.array([[0.3 * w, 0.35 * h, 0.62 * w, 0.7 * h], [0.1 * w, 0.6 * h, 0.27 * w, 0.83 * h]])
    labels = [label_assignment(box.copy(), (w, h), grid, True, True) for box in boxes]
    targets = _box_with_score_map_label_collator(labels)
    positive = torch.zeros(len(boxes), grid[0] * grid[1], dtype=torch.bool)
    positive[targets["positive_sample_batch_dim_indices"], targets["positive_sample_map_dim_indices"]] = True
    # what the official builder makes of that config (it is not called: it only adds a printout)
    criterion = SimpleCriteria(torch.nn.BCEWithLogitsLoss(reduction="none"), GIoULoss(), True, 1.0, 1.0, "bce", "iou")
    out = criterion({"score_map": trained["score_map"], "boxes": trained["boxes"]}, targets)
    return {"label_boxes_px": torch.from_numpy(boxes).float(), "label_target_box": targets["boxes"],
            "label_positive": positive.view(len(boxes), grid[1], grid[0]), "loss": out.loss.reshape(1),
            "loss_cls": out.metrics["Loss/bce"].reshape(1), "loss_reg": out.metrics["Loss/iou"].reshape(1)}


def _track(official: Path, model, case: dict, frames, box) -> list[list[float]]:
    """The official evaluation loop (see the module docstring) on ``frames`` (T, H, W, 3) uint8 RGB."""
    import numpy as np
    import torch

    sys.path.insert(0, str(official))
    from trackit.core.operator.numpy.bbox.utility.image import bbox_clip_to_image_boundary
    from trackit.core.transforms.dataset_norm_stats import get_dataset_norm_stats_transform
    from trackit.core.utils.siamfc_cropping import apply_siamfc_cropping, get_siamfc_cropping_params
    from trackit.runners.evaluation.distributed.tracker_evaluator.components.post_process.box_with_score_map import (
        PostProcessing_BoxWithScoreMap,
    )
    from trackit.runners.evaluation.distributed.tracker_evaluator.default.pipelines.LoRATv2 import (
        search_region_cropping,
        template_foreground_indicating_mask_generation,
    )
    from trackit.runners.evaluation.distributed.tracker_evaluator.default.pipelines.utils.siamfc_post_process import (
        siamfc_post_process,
    )

    normalize = get_dataset_norm_stats_transform("imagenet", inplace=True)
    template_size = np.array(case["template"])
    sizes = [np.array(s) for s in case["search"]]
    feat = template_size // 14

    def crop(image, params, size, mean=None):
        out, image_mean, params = apply_siamfc_cropping(image.to(torch.float32), size, params, "bilinear", False,
                                                        mean)
        out.div_(255.)
        normalize(out)
        return out[None], image_mean, params

    image = torch.from_numpy(frames[0]).permute(2, 0, 1)
    z_params = get_siamfc_cropping_params(box, TRACKING["template_factor"], template_size)
    z, mean, z_params = crop(image, z_params, template_size)
    fg = template_foreground_indicating_mask_generation.get_foreground_bounding_box(
        box.copy(), z_params, template_size, (template_size[0] / feat[0], template_size[1] / feat[1]))
    mask = torch.zeros(1, feat[1], feat[0], dtype=torch.long)
    mask[0, fg[1]:fg[3], fg[0]:fg[2]] = 1
    provider = search_region_cropping.SiamFCCroppingParameterProvider(TRACKING["search_factor"],
                                                                      TRACKING["min_object_size"])
    provider.initialize(box)
    post = PostProcessing_BoxWithScoreMap(torch.device("cpu"), tuple(sizes[-1] // 14), tuple(sizes[-1]),
                                          TRACKING["window_penalty"])
    post.start()
    caches = tuple((torch.zeros(s), torch.zeros(s)) for s in model.get_kv_cache_shapes(1))
    rows = torch.zeros(1, dtype=torch.int32)

    def update(image):  # phase 2: the frame around the cached box becomes the reference
        params = provider.get(sizes[0], TRACKING["reference_factor"])
        x, _, _ = crop(image, params, sizes[0], mean)
        model("update", 0, x, caches, rows)

    lines = [[*box[:2], *(box[2:] - box[:2]), 1.0]]
    with torch.no_grad():
        model("init", z, mask, caches, rows)
        if len(sizes) == 2:
            update(image)
        for frame in frames[1:]:
            image = torch.from_numpy(frame).permute(2, 0, 1)
            params = provider.get(sizes[-1])
            x, _, params = crop(image, params, sizes[-1], mean)
            output = model("track", len(sizes) - 1, x, caches, rows)
            scores, boxes = siamfc_post_process(post(output), params[None])
            score, xyxy = float(scores[0]), boxes[0]
            frame_size = np.array((frame.shape[1], frame.shape[0]))
            provider.update(score, xyxy, frame_size)
            xyxy = bbox_clip_to_image_boundary(xyxy, frame_size)  # the reported box: inside the frame
            lines.append([*xyxy[:2], *(xyxy[2:] - xyxy[:2]), score])
            if len(sizes) == 2 and score > REFERENCE_THRESHOLD:
                update(image)
    return lines


def write_two_phase_files(out: Path, official: Path, seed: int = 11) -> None:
    """``OUT/phase2-files/``: what the official trainer leaves after both phases (trainable tensors
    only, ``phase1.safetensors`` and ``phase2.safetensors``), the backbone as a timm file
    (``backbone.safetensors``), and the outputs of the phase-2 model the official runner builds from
    them (``--weight_path`` phase 1, then phase 2: the phase-1 LoRA folds into the frozen streams on
    load) in ``io.safetensors``."""
    import timm
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(official))
    from trackit.models.methods.LoRATv2.model import LoRATv2 as Official

    one, two = CASES["phase1"], CASES["phase2"]
    g = torch.Generator().manual_seed(seed)
    first = _build(Official, timm, one, one["trainable"], seed, g)
    torch.manual_seed(seed)  # the same backbone again for phase 2
    vit = timm.create_model(SHAPE["timm_model"], pretrained=False, embed_dim=SHAPE["embed_dim"],
                            depth=SHAPE["depth"], num_heads=SHAPE["num_heads"])
    g2 = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vit.parameters():
            param.add_(torch.randn(param.shape, generator=g2) * 0.05)
    backbone = {k: v.detach().clone().contiguous() for k, v in vit.state_dict().items()}
    second = Official(vit, 14, tuple(two["template"]), tuple(tuple(x) for x in two["search"]), False, True,
                      tuple(two["trainable"]), SHAPE["lora_r"], SHAPE["lora_alpha"], 0.0, False).eval()

    def trainable(model) -> dict:
        return {k: v.detach().clone().contiguous() for k, v in model.named_parameters() if v.requires_grad}

    with torch.no_grad():
        for param in first.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        phase1 = trainable(first)
        second.load_state_dict(phase1, strict=False)  # the official runner's first --weight_path
        for param in second.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        for head in second.heads:
            head.reg_mlp.layers[-1].bias.add_(-1.95)
        phase2 = trainable(second)
        tw, th = two["template"]
        z = torch.randn(2, 3, th, tw, generator=g)
        mask = (torch.rand(2, th // 14, tw // 14, generator=g) > 0.5).long()
        xs = [torch.randn(2, 3, h, w, generator=g) for w, h in two["search"]]
        result = second("train", [z], xs, mask)
    folder = out / "phase2-files"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(phase1, str(folder / "phase1.safetensors"))
    save_file(phase2, str(folder / "phase2.safetensors"))
    save_file(backbone, str(folder / "backbone.safetensors"))
    save_file({"z": z, "z_feat_mask": mask, "x0": xs[0], "x1": xs[1], "score_map": result["score_map"],
               "boxes": result["boxes"]}, str(folder / "io.safetensors"))
    print(f"phase2-files: {len(phase1)} + {len(phase2)} trainable tensors -> {folder}")


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
    write_two_phase_files(args.out, args.official)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

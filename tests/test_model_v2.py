"""LoRATv2 network against the official code's outputs (bench/loratv2_reference.py, tiny random weights)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lorat.config import BackboneConfig, LoraConfig, ModelConfig
from lorat.model.v2 import KVCache, LoRATv2

from .conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "official-v2-tiny"


def _config(case) -> ModelConfig:
    """The tiny reference case as our config (phase 2: the first search region is the reference frame)."""
    backbone = BackboneConfig(embed_dim=case["embed_dim"], depth=case["depth"], num_heads=case["num_heads"],
                              mlp_ratio=case["mlp_ratio"])
    *reference, search = [tuple(s) for s in case["search"]]
    return ModelConfig(family="loratv2", backbone=backbone, template_size=tuple(case["template"]), search_size=search,
                       reference_size=reference[0] if reference else None, register_tokens=case["register_tokens"],
                       pos_grid=(37, 37), lora=LoraConfig(r=case["lora_r"], alpha=case["lora_alpha"]))


def _case(name: str):
    """The fixture's official training state dict, merged by the one loader, with its inputs."""
    from lorat.checkpoint.loader import load_model
    from lorat.config import Config

    case = json.loads((FIXTURES / name / "case.json").read_text())
    model, _ = load_model(FIXTURES / name / "official.safetensors", Config(model=_config(case)))
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    xs = [io[f"x{i}"] for i in range(len(case["search"]))]
    return model, io, xs


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_training_forward_equals_the_official(name):
    model, io, xs = _case(name)
    with torch.no_grad():
        out = model(io["z"], xs, io["z_feat_mask"])
    torch.testing.assert_close(out["score_map"], io["train_score_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"], io["train_boxes"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_kv_cached_steps_equal_the_official_and_the_full_forward(name):
    model, io, xs = _case(name)
    with torch.no_grad():
        full = model(io["z"], xs, io["z_feat_mask"])
        cache = model.encode_template(io["z"], io["z_feat_mask"])
        for index, x in enumerate(xs[:-1]):
            model.encode_reference(x, cache, index)
        cached = model.track(xs[-1], cache)
        again = model.track(xs[-1], cache)  # a track step leaves the cached chunks as they were
    for key in ("score_map", "boxes"):
        torch.testing.assert_close(cached[key], io[f"cached_{key}"], atol=1e-5, rtol=0)
        torch.testing.assert_close(cached[key], full[key], atol=1e-6, rtol=0)
        assert torch.equal(cached[key], again[key])


def test_cached_sequences_batch_and_split():
    model, io, xs = _case("phase2")
    with torch.no_grad():
        caches = [model.encode_template(io["z"][i:i + 1], io["z_feat_mask"][i:i + 1]) for i in (1, 0)]
        for cache, i in zip(caches, (1, 0), strict=True):
            model.encode_reference(xs[0][i:i + 1], cache)
        both = KVCache.cat(caches)  # sequence 1 first
        out = model.track(xs[1].flip(0), both)
        one = model.track(xs[1][1:], both.select(torch.tensor([0])))
    torch.testing.assert_close(out["score_map"], io["cached_score_map"].flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(one["score_map"], io["cached_score_map"][1:], atol=1e-5, rtol=0)
    assert both.offsets == [0, 4 + 64, 4 + 64 + 64] and len(both) == 2 and both.keys[0].shape[2] == 132


def test_streams_that_train_share_the_backbone_tensors():
    cfg = ModelConfig(family="loratv2", backbone=BackboneConfig(embed_dim=32, depth=1, num_heads=2),
                      template_size=(56, 56), reference_size=(56, 56), search_size=(84, 84), register_tokens=4,
                      pos_grid=(37, 37))
    model = LoRATv2(cfg, owned=[True, False, False])
    attn = model.blocks[0].attn
    assert attn.qkv[1].weight is attn.qkv[2].weight and attn.qkv[0].weight is not attn.qkv[1].weight
    assert model.chunk_sizes() == [4 + 16, 16, 36]
    with pytest.raises(ValueError, match="search region 1 expects 84x84"):
        model(torch.zeros(1, 3, 56, 56), [torch.zeros(1, 3, 56, 56), torch.zeros(1, 3, 56, 56)],
              torch.zeros(1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_lora_training_build_loads_the_official_training_layout(name):
    from lorat.checkpoint.keys import official_to_peft_keys
    from lorat.model.lora import add_stream_lora, merge_lora

    case = json.loads((FIXTURES / name / "case.json").read_text())
    trainable = case["trainable"]
    model = LoRATv2(_config(case), owned=[not on for on in trainable])
    add_stream_lora(model, _config(case).lora, trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == case["trainable_params"]
    assert sum(p.numel() for p in model.parameters()) == case["total_params"]
    official = load_file(str(FIXTURES / name / "official.safetensors"))
    model.load_state_dict(official_to_peft_keys(official), strict=True)
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    xs = [io[f"x{i}"] for i in range(len(case["search"]))]
    with torch.no_grad():
        trained = model.eval()(io["z"], xs, io["z_feat_mask"])
        merged = merge_lora(model)(io["z"], xs, io["z_feat_mask"])
    torch.testing.assert_close(trained["score_map"], io["train_score_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(merged["score_map"], io["cached_score_map"], atol=1e-5, rtol=0)
    assert set(model.state_dict()) == set(LoRATv2(_config(case), owned=[True] * len(trainable)).state_dict())


# (trainable, total) parameters of the official training build (trackit LoRATv2 on timm's
# vit_{base,large}_patch14_reg4_dinov2; phase 2 trains stream 2 only) and the parameters of its
# inference build (every stream merged), counted on the meta device.
OFFICIAL_COUNTS = {"v2-p1-b224": (23_602_181, 131_444_741, 173_967_365),
                   "v2-p1-l224": (60_829_701, 440_770_565, 610_787_333),
                   "v2-p2-b378": (12_983_813, 271_970_314, 261_353_482),
                   "v2-p2-l378": (32_516_101, 945_516_554, 917_205_002)}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_bundled_v2_configs_count_the_official_parameters(name):
    from lorat.config import load_config
    from lorat.info import model_summary

    counts = model_summary(load_config(name))["parameters"]
    assert (counts["trainable"], counts["total"], counts["inference"]) == OFFICIAL_COUNTS[name]


@pytest.mark.parametrize("overrides, message", [
    (["model.register_tokens=4"], "are LoRATv2's"),
    (["model.family=loratv2"], "pos_grid"),
    (["model.family=loratv2", "model.pos_grid=8"], "exceeds the [8, 8] position grid"),
    (["model.family=loratv2", "model.pos_grid=37", "model.backbone.ffn=swiglu"], "plain MLP"),
    (["model.family=loratv2", "model.pos_grid=37", "model.reference_size=100"], "multiples of patch_size"),
    (["tracking.reference_threshold=1.5"], "reference_threshold"),
])
def test_v2_config_values_are_checked(overrides, message):
    from lorat.config import load_config
    from lorat.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("b224", overrides)


def _tracker(name: str, **kwargs):
    from lorat.config import Config, TrackingConfig
    from lorat.tracking.tracker import Tracker

    case = json.loads((FIXTURES / name / "case.json").read_text())
    model, _, _ = _case(name)
    t = case["tracking"]
    tracking = TrackingConfig(template_area_factor=t["template_factor"], search_area_factor=t["search_factor"],
                              min_object_size=t["min_object_size"], window_penalty=t["window_penalty"],
                              reference_area_factor=t["reference_factor"],
                              reference_threshold=case["reference_threshold"])
    return Tracker(model, Config(model=model.cfg, tracking=tracking), **kwargs)


@pytest.mark.parametrize("name", ["phase1", "phase2"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_tracking_trajectory_equals_the_official_loop(name, kv_cache):
    import numpy as np

    frames = np.load(FIXTURES / name / "frames.npz")["frames"]
    expected = np.loadtxt(FIXTURES / name / "trajectory.txt", delimiter=",")
    tracker = _tracker(name, kv_cache=kv_cache)
    results = [r.targets[0] for r in tracker.stream(list(frames), expected[0, :4])]
    np.testing.assert_allclose(np.array([r.box for r in results]), expected[:, :4], atol=0.05, rtol=0)
    np.testing.assert_allclose(np.array([r.score for r in results]), expected[:, 4], atol=1e-4, rtol=0)


def test_our_single_file_round_trip_through_the_one_loader(tmp_path):
    import numpy as np

    from lorat.checkpoint.loader import load_model, save_model
    from lorat.tracking.tracker import Tracker

    tracker = _tracker("phase2")
    path = save_model(tracker.model, tracker.config, tmp_path / "v2.safetensors")
    model, config = load_model(path)
    assert isinstance(model, LoRATv2) and config == tracker.config
    frames = np.load(FIXTURES / "phase2" / "frames.npz")["frames"]
    expected = np.loadtxt(FIXTURES / "phase2" / "trajectory.txt", delimiter=",")
    again = Tracker.from_pretrained(path, device="cpu")
    boxes = np.array([r.targets[0].box for r in again.stream(list(frames), expected[0, :4])])
    np.testing.assert_allclose(boxes, expected[:, :4], atol=0.05, rtol=0)
    shared = LoRATv2(model.cfg)  # streams sharing tensors (a training build) save too
    save_model(shared, config, tmp_path / "shared.safetensors")
    assert isinstance(load_model(tmp_path / "shared.safetensors")[0], LoRATv2)


def test_bench_times_the_cached_and_the_uncached_step(tmp_path, capsys):
    from lorat.bench import main as bench
    from lorat.checkpoint.loader import save_model

    tracker = _tracker("phase2")
    path = save_model(tracker.model, tracker.config, tmp_path / "v2.safetensors")
    results = []
    for extra in ([], ["--no-kv-cache"]):
        assert bench(["--weights", str(path), "--device", "cpu", "--frames", "6", "--iters", "2", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert [r["kv_cache"] for r in results] == [True, False]
    assert all(r["model_fps"] > 0 and r["variant"] == "custom" for r in results)


@pytest.mark.parametrize("extra", [[], ["--no-kv-cache"]])
def test_track_cli_gives_the_official_trajectory(tmp_path, extra):
    import cv2
    import numpy as np

    from lorat.checkpoint.loader import save_model
    from lorat.errors import run_cli
    from lorat.track import main

    tracker = _tracker("phase2")
    weights = save_model(tracker.model, tracker.config, tmp_path / "v2.safetensors")
    frames = np.load(FIXTURES / "phase2" / "frames.npz")["frames"]
    (tmp_path / "seq").mkdir()
    for i, frame in enumerate(frames):
        cv2.imwrite(str(tmp_path / "seq" / f"{i:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    expected = np.loadtxt(FIXTURES / "phase2" / "trajectory.txt", delimiter=",")
    init = ",".join(f"{v:g}" for v in expected[0, :4])
    out = tmp_path / "boxes.txt"
    assert run_cli(main, [str(tmp_path / "seq"), "--weights", str(weights), "--device", "cpu", "--init", init,
                          "--save-txt", str(out), *extra]) == 0
    np.testing.assert_allclose(np.loadtxt(out, delimiter="\t"), expected[:, :4], atol=0.05, rtol=0)


def _tiny_v2_config(reference: bool):
    return ModelConfig(family="loratv2", backbone=BackboneConfig(embed_dim=64, depth=2, num_heads=2),
                       template_size=(56, 56), reference_size=(56, 56) if reference else None, search_size=(84, 84),
                       register_tokens=4, pos_grid=(37, 37), lora=LoraConfig(r=4, alpha=4))


@pytest.mark.parametrize("reference", [False, True])
def test_training_build_starts_every_stream_from_the_backbone(tmp_path, reference):
    import timm
    from safetensors.torch import save_file

    from lorat.checkpoint.build import build_lorat
    from lorat.errors import WeightsError

    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, embed_dim=64, depth=2, num_heads=2)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "reg4.safetensors"))
    cfg = _tiny_v2_config(reference)
    model = build_lorat(cfg, tmp_path / "reg4.safetensors")
    state = model.state_dict()
    for s in range(model.streams):
        for name in ("attn.proj", "mlp.fc1"):
            key = f"blocks.1.{name}.{s}.base_layer.weight"  # a stream that trains (peft) or a frozen one
            key = key if key in state else key.replace(".base_layer", "")
            assert torch.equal(state[key], vit.state_dict()[f"blocks.1.{name}.weight"])
    assert torch.equal(model.reg_token, vit.reg_token) and torch.equal(model.pos_embed, vit.pos_embed)
    assert torch.equal(model.norms[-1].weight, vit.norm.weight)
    trainable = {n.split(".lora")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert trainable and all(re.search(r"\.2(\.|$)", n) or not reference for n in trainable)  # phase 2: stream 2
    vit.reg_token = None
    plain = {k: v.contiguous() for k, v in vit.state_dict().items() if k != "reg_token"}
    save_file(plain, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="without register tokens"):
        build_lorat(cfg, tmp_path / "plain.safetensors")


def test_phase_one_trains_with_the_lorat_trainer(synthetic, tmp_path):
    import yaml
    from safetensors.torch import load_file

    from lorat.checkpoint.keys import peft_to_official_keys
    from lorat.config import load_config
    from lorat.errors import run_cli
    from lorat.model import build_network
    from lorat.tracking.tracker import Tracker
    from lorat.train import main as train

    config = {"model": {"family": "loratv2", "variant": "v2-debug", "register_tokens": 4, "pos_grid": 37,
                        "backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2},
                        "template_size": 56, "search_size": 84, "lora": {"r": 4, "alpha": 4}},
              "train": {"batch_size": 4, "samples_per_epoch": 8, "epochs": 1, "num_workers": 0, "val_samples": 0}}
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(config))
    assert run_cli(train, [str(tmp_path / "v2.yaml"), "--data", f"lasot={synthetic}", "--output",
                           str(tmp_path / "run")]) == 0
    folder = tmp_path / "run" / "checkpoint" / "epoch_001"
    cfg = load_config(tmp_path / "v2.yaml").model
    with torch.device("meta"):
        trainable = [n for n, p in build_network(cfg, cfg.lora).named_parameters() if p.requires_grad]
    official = set(peft_to_official_keys(dict.fromkeys(trainable), swiglu=False))
    assert set(load_file(str(folder / "model.safetensors"))) == official
    assert isinstance(Tracker.from_pretrained(folder / "lorat.safetensors", device="cpu").model, LoRATv2)


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_official_full_state_dicts_load_through_the_one_loader(name, tmp_path):
    import yaml

    from lorat.checkpoint.loader import load_model
    from lorat.config import Config, config_to_dict, load_config
    from lorat.errors import WeightsError

    case = json.loads((FIXTURES / name / "case.json").read_text())
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(config_to_dict(Config(model=_config(case)))))
    model, _ = load_model(FIXTURES / name / "official.safetensors", load_config(tmp_path / "v2.yaml"))
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    xs = [io[f"x{i}"] for i in range(len(case["search"]))]
    with torch.no_grad():
        out = model(io["z"], xs if len(xs) > 1 else xs[0], io["z_feat_mask"])
    torch.testing.assert_close(out["score_map"], io["cached_score_map"], atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="is a LoRATv2 checkpoint, but the config describes debug"):
        load_model(FIXTURES / name / "official.safetensors", load_config("debug"))


def test_evaluator_batches_cached_sequences_and_gives_the_official_trajectory(tmp_path):
    import cv2
    import numpy as np

    from lorat.checkpoint.loader import save_model
    from lorat.errors import run_cli
    from lorat.evaluate import main as evaluate

    tracker = _tracker("phase2")
    weights = save_model(tracker.model, tracker.config, tmp_path / "v2.safetensors")
    frames = np.load(FIXTURES / "phase2" / "frames.npz")["frames"]
    expected = np.loadtxt(FIXTURES / "phase2" / "trajectory.txt", delimiter=",")
    # the whole clip, and two shorter ones that end (and retire from the batch) at other frames
    for name, (start, stop) in {"a-full": (0, 24), "b-head": (0, 9), "c-tail": (5, 17)}.items():
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for i, frame in enumerate(frames[start:stop]):
            cv2.imwrite(str(folder / f"{i:04d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        np.savetxt(folder / "groundtruth.txt", expected[start:stop, :4], fmt="%.6f", delimiter=",")
    assert run_cli(evaluate, ["--weights", str(weights), "--dataset", f"custom={tmp_path / 'data'}", "--output",
                              str(tmp_path / "out"), "--device", "cpu", "--batch", "2"]) == 0
    result = next((tmp_path / "out" / "custom").glob("*/a-full.txt"))
    np.testing.assert_allclose(np.loadtxt(result, delimiter="\t"), expected[:, :4], atol=0.05, rtol=0)


def test_official_phase_one_trainable_checkpoint_with_its_backbone(tmp_path):
    """The official trainer's file (trainable tensors only) + a timm DINOv2-with-registers file, both cut
    from the phase-1 fixture, load into the fixture's model."""
    import yaml
    from safetensors.torch import save_file

    from lorat.checkpoint.loader import load_model
    from lorat.config import Config, config_to_dict, load_config

    case = json.loads((FIXTURES / "phase1" / "case.json").read_text())
    full = load_file(str(FIXTURES / "phase1" / "official.safetensors"))
    backbone = {"pos_embed": full["pos_embed"], "reg_token": full["reg_token"], "cls_token": torch.zeros(1, 1, 64),
                "norm.weight": full["norms.0.weight"], "norm.bias": full["norms.0.bias"]}
    for key, value in full.items():
        if key.startswith("patch_embed.") or re.match(r"blocks\.\d+\.(norm[12]|ls[12])\.", key):
            backbone[key] = value
        elif m := re.match(r"(blocks\.\d+\.(?:attn\.proj|mlp\.fc[12]))\.0\.linear\.(weight|bias)$", key):
            backbone[f"{m.group(1)}.{m.group(2)}"] = value
        elif m := re.match(r"(blocks\.\d+)\.attn\.qkv\.0\.q\.linear\.(weight|bias)$", key):
            parts = [full[f"{m.group(1)}.attn.qkv.0.{t}.linear.{m.group(2)}"] for t in "qkv"]
            backbone[f"{m.group(1)}.attn.qkv.{m.group(2)}"] = torch.cat(parts)
    trainable = {k: v for k, v in full.items() if ".lora." in k or k.startswith(("heads.", "template_token_type",
                                                                                   "search_region_token_type"))}
    save_file(backbone, str(tmp_path / "reg4.safetensors"))
    save_file(trainable, str(tmp_path / "model.safetensors"))
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(config_to_dict(Config(model=_config(case)))))
    config = load_config(tmp_path / "v2.yaml")
    model, _ = load_model(tmp_path / "model.safetensors", config, tmp_path / "reg4.safetensors")
    io = load_file(str(FIXTURES / "phase1" / "io.safetensors"))
    with torch.no_grad():
        out = model(io["z"], io["x0"], io["z_feat_mask"])
    torch.testing.assert_close(out["score_map"], io["cached_score_map"], atol=1e-5, rtol=0)


def test_onnx_export_refuses_v2_by_name(tmp_path, capsys):
    pytest.importorskip("onnx")
    from lorat.checkpoint.loader import save_model
    from lorat.errors import run_cli
    from lorat.export import main as export

    tracker = _tracker("phase1")
    weights = save_model(tracker.model, tracker.config, tmp_path / "v2.safetensors")
    assert run_cli(export, ["--weights", str(weights), "--onnx", str(tmp_path / "v2.onnx")]) != 0
    assert "LoRATv2 model, which runs with torch" in capsys.readouterr().err
    assert not (tmp_path / "v2.onnx").exists()


def test_gradient_checkpointing_gives_the_same_gradients():
    model = LoRATv2(_tiny_v2_config(True)).train()
    z, x, ref = torch.randn(2, 3, 56, 56), torch.randn(2, 3, 84, 84), torch.randn(2, 3, 56, 56)
    mask = torch.ones(2, 4, 4, dtype=torch.long)
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.grad_checkpointing = recompute
        out = model(z, [ref, x], mask)
        (out["score_map"].sum() + out["boxes"].sum()).backward()
        grads.append(model.template_token_type_embed.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_vot_session_answers_the_official_trajectory():
    import numpy as np

    from lorat.evaluation.results import rasterize_xywh
    from lorat.vot.masks import filled_boxes
    from lorat.vot.session import Start, VotSession

    frames = np.load(FIXTURES / "phase2" / "frames.npz")["frames"]
    expected = np.loadtxt(FIXTURES / "phase2" / "trajectory.txt", delimiter=",")
    session = VotSession(_tracker("phase2"), filled_boxes, "auto")
    session.initialize(frames[0], [Start(tuple(map(float, expected[0, :4])))])
    answers = [session.frame(f)[0] for f in frames[1:]]
    np.testing.assert_array_equal([a.box for a in answers], rasterize_xywh(expected[1:, :4]))
    np.testing.assert_allclose([a.score for a in answers], expected[1:, 4], atol=1e-4)


def test_official_phase_two_files_load_on_their_phase_one_file_and_backbone(tmp_path, capsys):
    import yaml

    from lorat.checkpoint.loader import load_model
    from lorat.config import Config, config_to_dict, load_config
    from lorat.errors import WeightsError, run_cli
    from lorat.info import main as info

    case = json.loads((FIXTURES / "phase2" / "case.json").read_text())
    folder = FIXTURES / "phase2-files"
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(config_to_dict(Config(model=_config(case)))))
    config = load_config(tmp_path / "v2.yaml")
    model, _ = load_model(folder / "phase2.safetensors", config, folder / "backbone.safetensors",
                          phase1_weights=folder / "phase1.safetensors")
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        out = model(io["z"], [io["x0"], io["x1"]], io["z_feat_mask"])
    torch.testing.assert_close(out["score_map"], io["score_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["boxes"], io["boxes"], atol=1e-5, rtol=0)
    with pytest.raises(WeightsError, match="needs the DINOv2 with registers backbone file"):
        load_model(folder / "phase2.safetensors", config, phase1_weights=folder / "phase1.safetensors")
    with pytest.raises(WeightsError, match="phase-1 checkpoint"):  # without it: refused, not guessed
        load_model(folder / "phase2.safetensors", config, folder / "backbone.safetensors")
    with pytest.raises(WeightsError, match="expected the official phase-1 checkpoint"):
        load_model(folder / "phase2.safetensors", config, folder / "backbone.safetensors",
                   phase1_weights=folder / "backbone.safetensors")
    with pytest.raises(WeightsError, match="goes with an official LoRATv2 phase-2 checkpoint"):
        load_model(FIXTURES / "phase2" / "official.safetensors", config, phase1_weights=folder / "phase1.safetensors")
    assert run_cli(info, ["--config", str(tmp_path / "v2.yaml"), "--weights", str(folder / "phase2.safetensors"),
                          "--backbone-weights", str(folder / "backbone.safetensors")]) == 2
    assert "pass --phase1-weights FILE" in capsys.readouterr().err


def _reg4_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, embed_dim=64, depth=2, num_heads=2)
    path = tmp_path / "reg4.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit


def _v2_yaml(tmp_path, name: str, reference: bool) -> str:
    import yaml

    model = {"family": "loratv2", "variant": name, "register_tokens": 4, "pos_grid": 37,
             "backbone": {"embed_dim": 64, "depth": 2, "num_heads": 2}, "template_size": 56, "search_size": 84,
             "lora": {"r": 4, "alpha": 4}}
    tracking = {}
    if reference:
        model |= {"reference_size": 56, "search_size": 70}
        tracking = {"search_area_factor": 5.0, "reference_area_factor": 4.0}
    config = {"model": model, "tracking": tracking,
              "train": {"batch_size": 4, "samples_per_epoch": 8, "epochs": 1, "num_workers": 0, "val_samples": 0,
                        "lr": 1e-2}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_phase_two_samples_hold_the_reference_and_the_search_region(synthetic, tmp_path):
    import numpy as np

    from lorat.config import load_config
    from lorat.data.pairs import PairDataset, Source, _aux_frame
    from lorat.data.sequences import read_dataset

    cfg = load_config(_v2_yaml(tmp_path, "p2", reference=True))
    pairs = PairDataset([Source("lasot", read_dataset("lasot", synthetic), 1.0)], cfg.model, cfg.tracking, cfg.train,
                        4, seed=0)
    sample = pairs[1]
    assert sample["z"].shape == sample["x_ref"].shape == (3, 56, 56) and sample["x"].shape == (3, 70, 70)
    assert sample["positive"].shape == (5, 5) and sample["positive"].any()  # labels of the search region only
    assert sample["z_feat_mask"].shape == (4, 4)
    assert all(torch.equal(sample[k], pairs[1][k]) for k in sample)  # a pure function of (seed, epoch, index)
    rng = np.random.default_rng(0)
    present = np.ones(10, dtype=bool)
    assert {_aux_frame(present, 3, rng) for _ in range(200)} == set(range(10)) - {3}  # the whole track but z
    only = np.zeros(10, dtype=bool)
    only[3] = True
    assert _aux_frame(only, 3, rng) == 3


def test_phase_two_trains_on_the_phase_one_model(synthetic, tmp_path, capsys):
    from lorat.checkpoint.loader import load_model
    from lorat.errors import run_cli
    from lorat.tracking.tracker import Tracker
    from lorat.train import main as train

    backbone, vit = _reg4_file(tmp_path)
    p1, p2 = _v2_yaml(tmp_path, "p1", reference=False), _v2_yaml(tmp_path, "p2", reference=True)
    data = ["--data", f"lasot={synthetic}", "--backbone-weights", str(backbone)]
    assert run_cli(train, [p1, *data, "--output", str(tmp_path / "run1")]) == 0
    first_file = tmp_path / "run1" / "checkpoint" / "epoch_001" / "lorat.safetensors"

    assert run_cli(train, [p2, *data, "--output", str(tmp_path / "nothing")]) == 2
    assert "--phase1-weights FILE" in capsys.readouterr().err
    assert run_cli(train, [p1, *data, "--phase1-weights", str(first_file), "--output", str(tmp_path / "x")]) == 2
    assert "is for LoRATv2 phase 2" in capsys.readouterr().err
    demo = ROOT / "weights" / "lorat_demo.safetensors"
    assert run_cli(train, [p2, *data, "--phase1-weights", str(demo), "--output", str(tmp_path / "demo")]) == 2
    assert "not a LoRATv2 phase-1 model" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    assert run_cli(train, [p2, *data, "--phase1-weights", str(missing), "--output", str(tmp_path / "m")]) == 2
    assert f"--phase1-weights {missing}: file not found" in capsys.readouterr().err

    assert run_cli(train, [p2, *data, "--phase1-weights", str(first_file), "--output", str(tmp_path / "run2")]) == 0
    first, _ = load_model(first_file)
    second, config = load_model(tmp_path / "run2" / "checkpoint" / "epoch_001" / "lorat.safetensors")
    assert config.model.reference_size == (56, 56)
    a, b = first.state_dict(), second.state_dict()
    for key in ("blocks.1.attn.qkv.0.weight", "blocks.1.mlp.fc2.1.weight", "heads.0.cls_mlp.layers.0.weight",
                "norms.0.weight"):
        assert torch.equal(a[key], b[key]), key  # phase 1's streams, frozen through phase 2
    new = b["blocks.1.mlp.fc2.2.weight"]
    assert not torch.equal(new, vit.state_dict()["blocks.1.mlp.fc2.weight"])  # the search stream's LoRA trained
    assert isinstance(Tracker.from_pretrained(tmp_path / "run2" / "checkpoint" / "epoch_001" / "lorat.safetensors",
                                              device="cpu").model, LoRATv2)
    # resumable as LoRAT training is: stopped after one of its two steps, then resumed, bit for bit
    split = tmp_path / "split"
    assert run_cli(train, [p2, *data, "--phase1-weights", str(first_file), "--output", str(split),
                           "--stop-after", "1"]) == 0
    assert run_cli(train, ["--resume", str(split)]) == 0
    done = "checkpoint/epoch_001/lorat.safetensors"
    assert (split / done).read_bytes() == (tmp_path / "run2" / done).read_bytes()


@pytest.mark.parametrize("name", ["phase1", "phase2"])
def test_training_labels_and_loss_equal_the_official(name):
    """The official label generation and criterion (bench/loratv2_reference.py) on the official training
    forward: our labels (positive cells, normalised target box) and IoU-aware BCE + GIoU loss."""
    import numpy as np

    from lorat.data.pairs import search_labels
    from lorat.training.loss import lorat_loss

    case = json.loads((FIXTURES / name / "case.json").read_text())
    io = load_file(str(FIXTURES / name / "io.safetensors"))
    w, h = case["search"][-1]
    boxes = io["label_boxes_px"].double().numpy()
    positive = torch.stack([torch.from_numpy(search_labels(b, (w, h), (h // 14, w // 14))) for b in boxes])
    assert torch.equal(positive, io["label_positive"])
    target = torch.from_numpy((boxes / np.array([w, h, w, h])).astype(np.float32))
    torch.testing.assert_close(target, io["label_target_box"], rtol=0, atol=1e-7)
    loss = lorat_loss({"score_map": io["train_score_map"], "boxes": io["train_boxes"]}, target, positive)
    for ours, official in (("loss", "loss"), ("cls", "loss_cls"), ("reg", "loss_reg")):
        torch.testing.assert_close(loss[ours].reshape(1), io[official], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reference", [False, True])
def test_bench_times_training_steps_of_either_phase(tmp_path, capsys, reference):
    from lorat.bench import main as bench

    config = _v2_yaml(tmp_path, "p2" if reference else "p1", reference=reference)
    assert bench(["--config", config, "--train", "--steps", "1", "--batch", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples_per_s"] > 0 and result["loss"] > 0


def test_phase_two_training_starts_from_the_official_phase_one_file():
    """--phase1-weights with the official phase-1 file (and its backbone): the training model's template and
    reference streams are what the loader gives an official phase-2 file built on that phase 1."""
    from lorat.checkpoint.build import build_training_model
    from lorat.checkpoint.loader import load_model
    from lorat.config import Config
    from lorat.training.trainer import load_phase_one

    case = json.loads((FIXTURES / "phase2" / "case.json").read_text())
    folder = FIXTURES / "phase2-files"
    config = Config(model=_config(case))
    model = build_training_model(config, folder / "backbone.safetensors")
    load_phase_one(model, folder / "phase1.safetensors", str(folder / "backbone.safetensors"))
    loaded, _ = load_model(folder / "phase2.safetensors", config, folder / "backbone.safetensors",
                           phase1_weights=folder / "phase1.safetensors")
    ours, official = model.state_dict(), loaded.state_dict()
    phase_one = re.compile(r"^(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.[01]\.|norms\.0\.|heads\.0\.)")
    shared = [k for k in official if phase_one.search(k)]
    assert len(shared) == 16 * case["depth"] + 2 + 12 and all(k in ours for k in shared)
    for key in shared:
        torch.testing.assert_close(ours[key], official[key], rtol=0, atol=0, msg=key)

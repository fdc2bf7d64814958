"""Training numerics against the spec, determinism, resume and DDP."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorat.checkpoint.build import build_lorat
from lorat.checkpoint.loader import load_model
from lorat.config import TrainConfig, config_from_dict, load_config
from lorat.data.augment import color_jitter, deit3, hflip
from lorat.data.pairs import PairDataset, Source, epoch_picker, jittered_search_params, search_labels
from lorat.data.sequences import DatasetError, read_dataset
from lorat.errors import run_cli
from lorat.train import main
from lorat.training.loss import iou_and_giou, lorat_loss
from lorat.training.optim import learning_rate, lr_for_step, parameter_groups

from .conftest import ROOT

OFFICIAL = TrainConfig()


def test_learning_rate_schedule_official_values():
    assert lr_for_step(0, OFFICIAL, 1024) == lr_for_step(1, OFFICIAL, 1024) == pytest.approx(1e-7)
    assert learning_rate(1024, OFFICIAL, 1024) == pytest.approx(1e-7 + 1024 * (1e-4 - 1e-7) / 2048)
    assert learning_rate(2048, OFFICIAL, 1024) == pytest.approx(1e-4)
    mid = 2048 + 174080 // 2
    assert learning_rate(mid, OFFICIAL, 1024) == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    assert learning_rate(174079, OFFICIAL, 1024) == pytest.approx(1.034e-6, abs=2e-9)  # never reaches 1e-6
    assert lr_for_step(3000, OFFICIAL, 1024) == learning_rate(2999, OFFICIAL, 1024)


def test_parameter_groups_official():
    cfg = load_config(ROOT / "configs" / "b224.yaml")
    model = build_lorat(cfg.model, device="meta")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay, embed = ([names[id(p)] for p in g["params"]] for g in parameter_groups(model, 0.1))
    assert "head.cls_mlp.layers.2.weight" in no_decay and "head.reg_mlp.layers.2.weight" in decay
    assert "head.cls_mlp.layers.0.weight" in decay and "head.reg_mlp.layers.1.bias" in no_decay
    assert embed == ["token_type_embed"]
    assert all("lora_" in n for n in decay if n.startswith("blocks."))
    assert len(decay) + len(no_decay) + len(embed) == sum(p.requires_grad for p in model.parameters())
    assert len(no_decay) == 7  # six head biases + the (1, C) classifier weight


def test_loss_on_hand_made_batch():
    boxes = torch.zeros(1, 2, 2, 4)
    boxes[0, 0, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])
    boxes[0, 0, 1] = torch.tensor([0.0, 0.0, 0.2, 0.2])
    out = {"score_map": torch.zeros(1, 2, 2), "boxes": boxes}
    gt = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    positive = torch.tensor([[[True, False], [False, False]]])
    loss = lorat_loss(out, gt, positive)
    assert loss["cls"].item() == pytest.approx(4 * math.log(2), rel=1e-6)  # logit 0: BCE = log 2 whatever the target
    assert loss["reg"].item() == pytest.approx(0.5, rel=1e-5)  # IoU 0.5 and the enclosing box is the union
    out["score_map"] = torch.tensor([[[2.0, -1.0], [0.0, 3.0]]])
    positive = torch.tensor([[[True, True], [False, False]]])
    loss = lorat_loss(out, gt, positive)
    p = torch.sigmoid(out["score_map"].flatten())
    targets = torch.tensor([0.5, 0.08, 0.0, 0.0])  # IoU(gt, [0,0,.2,.2]) = 0.04 / 0.5
    bce = -(targets * p.log() + (1 - targets) * (1 - p).log()).sum() / 2
    assert loss["cls"].item() == pytest.approx(bce.item(), rel=1e-5)
    assert loss["reg"].item() == pytest.approx(((1 - 0.5) + (1 - 0.08)) / 2, rel=1e-5)
    iou, giou = iou_and_giou(torch.tensor([[0.0, 0, 0.2, 0.2]]), torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    assert iou.item() == 0 and giou.item() == pytest.approx(-(1 - 0.29), rel=1e-5)
    loss = lorat_loss(out, gt, positive, num_positive=torch.tensor(4.0))  # the DDP-mean normaliser
    assert loss["reg"].item() == pytest.approx(((1 - 0.5) + (1 - 0.08)) / 4, rel=1e-5)


def test_search_labels_and_jitter_geometry():
    pos = search_labels(np.array([14.0, 28.0, 42.0, 56.5]), (224, 224), (16, 16))
    assert sorted(zip(*np.nonzero(pos), strict=True)) == [(r, c) for r in (2, 3, 4) for c in (1, 2)]
    cfg = config_from_dict({})
    box = np.array([100.3, 120.7, 180.2, 200.9])
    still = TrainConfig(scale_jitter=0.0, translation_jitter=0.0)
    s, t = jittered_search_params(box, cfg.model.search_size, 4.0, still, np.random.default_rng(0))
    np.testing.assert_allclose(s[0].numpy(), [0.699563] * 2, atol=1e-6)  # no jitter: the nominal crop
    np.testing.assert_allclose(t[0].numpy(), [13.886, -0.490], atol=1e-3)
    rng = np.random.default_rng(1)
    draws = [jittered_search_params(box, cfg.model.search_size, 4.0, OFFICIAL, rng) for _ in range(400)]
    log_ratio = np.log(np.array([d[0][0].numpy() for d in draws]) / 0.699563)
    assert 0.2 < log_ratio.std() < 0.3  # scale jitter 0.25 per axis, independent axes
    assert abs(np.corrcoef(log_ratio.T)[0, 1]) < 0.2
    impossible = TrainConfig(min_object_size=500)
    assert jittered_search_params(box, cfg.model.search_size, 4.0, impossible, rng) is None


def test_epoch_picker_quotas():
    picked = epoch_picker([3, 5], [1.0, 1.0], 10, np.random.default_rng(0))
    assert (picked[:, 0] == 0).sum() == 5 and (picked[:, 0] == 1).sum() == 5
    assert sorted(picked[picked[:, 0] == 1, 1]) == [0, 1, 2, 3, 4]  # one permutation of the 5 sequences
    counts = np.bincount(picked[picked[:, 0] == 0, 1], minlength=3)
    assert sorted(counts) == [1, 2, 2]


def test_augmentations():
    image = torch.rand(3, 8, 10)
    flipped, box = hflip(image, np.array([1.0, 2.0, 4.0, 6.0]))
    assert torch.equal(flipped[:, :, 0], image[:, :, -1]) and box.tolist() == [6.0, 2.0, 9.0, 6.0]
    same = color_jitter(image, np.random.default_rng(0), strength=0.0)
    torch.testing.assert_close(same, image)
    out = deit3([image, image.clone()], np.random.default_rng(0))
    for img in out:
        assert torch.equal(img, torch.round(img * 255) / 255)  # 8-bit quantised
    assert torch.equal(out[0], out[1])  # the same operation on both images


def test_synthetic_dataset_and_pairs(synthetic):
    seqs = read_dataset("lasot", synthetic)
    assert len(seqs) == 4 and len(seqs[0]) == 30
    cfg = load_config(ROOT / "configs" / "debug.yaml")
    ds = PairDataset([Source("lasot", seqs, 1.0)], cfg.model, cfg.tracking, cfg.train, 8, seed=3)
    ds.set_epoch(0)
    a, b = ds[5], ds[5]
    for key in a:
        assert torch.equal(a[key], b[key])  # a sample is a pure function of (seed, epoch, index)
    assert a["z"].shape == (3, 112, 112) and a["x"].shape == (3, 224, 224)
    assert a["positive"].any() and a["z_feat_mask"].any()
    x1, y1, x2, y2 = a["target_box"].tolist()
    assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and (x2 - x1) * 224 >= 10 - 1e-4


def _train(args, env=None):
    return subprocess.run([sys.executable, "-m", "lorat.train", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def _weights(run):
    return torch.load(run / "state.pt", weights_only=True)["weights"]


def test_resume_is_bit_exact(synthetic, tmp_path):
    common = ["configs/debug.yaml", "--data", f"lasot={synthetic}", "--set", "train.val_samples=0",
              "--set", "train.samples_per_epoch=16", "--set", "train.batch_size=4", "--set", "train.epochs=1"]
    assert run_cli(main, [*common, "--output", str(tmp_path / "straight")]) == 0
    assert run_cli(main, [*common, "--output", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert torch.load(tmp_path / "split" / "state.pt", weights_only=True)["step"] == 2
    # resume with data workers this time: the samples must not depend on them
    assert run_cli(main, ["--resume", str(tmp_path / "split"), "--set", "train.num_workers=2"]) == 0
    straight, split = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    for key in straight:
        assert torch.equal(straight[key], split[key]), key
    ckpt = tmp_path / "straight" / "checkpoint" / "epoch_001" / "lorat.safetensors"
    model, _ = load_model(ckpt)  # the single file loads for tracking
    assert model.cfg.variant == "debug"


def test_stop_at_an_epoch_end_still_validates_and_checkpoints(synthetic, tmp_path):
    run = tmp_path / "run"
    common = ["--set", "train.samples_per_epoch=8", "--set", "train.batch_size=4", "--set", "train.epochs=2",
              "--set", "train.val_samples=4", "--set", "train.checkpoint_every=1"]
    assert run_cli(main, ["configs/debug.yaml", "--data", f"lasot={synthetic}", "--val-data", f"lasot={synthetic}",
                          *common, "--output", str(run), "--stop-after", "2"]) == 0
    assert (run / "checkpoint" / "epoch_001" / "lorat.safetensors").is_file()
    assert (run / "val.csv").read_text().splitlines()[1].startswith("1,")
    assert run_cli(main, ["--resume", str(run)]) == 0
    assert (run / "checkpoint" / "epoch_002" / "lorat.safetensors").is_file()
    assert [line.split(",")[0] for line in (run / "val.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_lora_checkpoint_is_official_format(synthetic, tmp_path):
    cfg = ["configs/debug.yaml", "--data", f"lasot={synthetic}", "--set", "train.finetune=lora",
           "--set", "train.val_samples=0", "--set", "train.samples_per_epoch=8", "--set", "train.epochs=1"]
    assert run_cli(main, [*cfg, "--output", str(tmp_path / "lora")]) == 0
    official = load_file(tmp_path / "lora" / "checkpoint" / "epoch_001" / "model.safetensors")
    assert "blocks.0.attn.qkv.q.lora.A" in official and "token_type_embed" in official
    assert not any("base_layer" in k or "patch_embed" in k for k in official)


@pytest.mark.slow
def test_ddp_two_processes_match_one(synthetic, tmp_path):
    common = ["configs/debug.yaml", "--data", f"lasot={synthetic}", "--set", "train.val_samples=0",
              "--set", "train.samples_per_epoch=16", "--set", "train.batch_size=8", "--set", "train.epochs=1",
              "--device", "cpu"]
    one = _train([*common, "--output", tmp_path / "one"])
    assert one.returncode == 0, one.stderr[-2000:]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lorat.train", *common, "--output", str(tmp_path / "two")], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)


def test_dataset_errors(tmp_path, synthetic):
    with pytest.raises(DatasetError, match="folder not found"):
        read_dataset("lasot", tmp_path / "nope")
    bad = tmp_path / "bad" / "cat" / "cat-1"
    (bad / "img").mkdir(parents=True)
    (bad / "groundtruth.txt").write_text("1,2,3,4\n5,6,seven,8\n")
    with pytest.raises(DatasetError, match=r"groundtruth.txt:2: expected 4 numbers"):
        read_dataset("lasot", tmp_path / "bad")
    custom = tmp_path / "custom" / "seq1"
    custom.mkdir(parents=True)
    for i in range(3):
        (custom / f"{i:04d}.jpg").write_bytes(b"")
    (custom / "groundtruth.txt").write_text("1,2,3,4\n")
    with pytest.raises(DatasetError, match="1 boxes for 3 frames"):
        read_dataset("custom", tmp_path / "custom")
    code = run_cli(main, ["configs/debug.yaml", "--data", "lasot=/nonexistent", "--output", str(tmp_path / "r")])
    assert code == 2
    assert run_cli(main, ["configs/debug.yaml", "--data", "imagenet=/x", "--output", str(tmp_path / "r")]) == 2


def test_unreadable_images_are_skipped_and_counted(tmp_path, synthetic, capsys):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(synthetic, root)
    for path in list(root.rglob("*.jpg"))[::3]:
        path.write_bytes(b"not a jpeg")
    run = tmp_path / "run"
    assert run_cli(main, ["configs/debug.yaml", "--data", f"lasot={root}", "--set", "train.val_samples=0",
                          "--set", "train.samples_per_epoch=16", "--set", "train.epochs=1",
                          "--output", str(run)]) == 0
    assert "unreadable images were skipped" in capsys.readouterr().out
    rows = (run / "metrics.csv").read_text().splitlines()
    assert int(rows[-1].split(",")[-1]) > 0


@pytest.mark.slow
def test_sigterm_saves_resumable_state_and_elastic_restart_resumes(synthetic, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "lorat.train", "configs/debug.yaml", "--data", f"lasot={synthetic}",
            "--set", "train.val_samples=0", "--set", "train.samples_per_epoch=4000", "--set", "train.batch_size=2",
            "--set", "train.epochs=1", "--set", "train.num_workers=2", "--log-every", "1", "--output", str(run)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "metrics.csv").is_file()
                                          and len((run / "metrics.csv").read_text().splitlines()) > 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # like a scheduler or Ctrl-C: the data workers get it too
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "resumable state" in stdout
    step = torch.load(run / "state.pt", weights_only=True)["step"]
    assert step >= 3
    # a worker restarted by torchrun (--max-restarts) continues from the state without --resume
    env = dict(os.environ, TORCHELASTIC_RESTART_COUNT="1")
    again = subprocess.run([*args, "--stop-after", str(step + 2)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert torch.load(run / "state.pt", weights_only=True)["step"] == step + 2
    # without a restart, an existing run is never overwritten by accident
    fresh = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr

"""Generated clips of cut-out objects (lorat.data.cutouts): masks, boxes, layout, training pairs, fine-tuning."""

import cv2
import numpy as np
import pytest
import torch

from lorat.checkpoint.build import build_training_model
from lorat.checkpoint.loader import save_model
from lorat.config import config_from_dict, config_to_dict
from lorat.data.cutouts import Cutout, Variety, held_out, is_photograph, load_cutouts, main, make_clip
from lorat.data.pairs import PairDataset, Source
from lorat.data.sequences import read_dataset
from lorat.errors import LoratError, run_cli

from .helpers import tiny_config


def _ellipse(colour=(0, 255, 0), size=(120, 40), noise=0.0, seed=0) -> np.ndarray:
    """An RGBA cut-out: a filled ellipse (optionally noisy, like a photograph) on a transparent canvas."""
    w, h = size
    rgba = np.zeros((h + 20, w + 20, 4), np.uint8)
    cv2.ellipse(rgba, (w // 2 + 10, h // 2 + 10), (w // 2, h // 2), 0, 0, 360, (*colour, 255), -1)
    if noise:
        rng = np.random.default_rng(seed)
        rgba[..., :3] = np.clip(rgba[..., :3] + rng.normal(0, noise, rgba[..., :3].shape), 0, 255).astype(np.uint8)
    return rgba


def test_photographs_and_drawings_told_apart():
    assert not is_photograph(_ellipse())  # flat colour: a drawing
    assert is_photograph(_ellipse(colour=(120, 90, 60), noise=8))  # sensor noise and shading: a photograph


def test_load_cutouts_crops_to_the_mask_and_skips_non_cutouts(tmp_path):
    cv2.imwrite(str(tmp_path / "ellipse.png"), cv2.cvtColor(_ellipse(noise=8), cv2.COLOR_RGBA2BGRA))
    cv2.imwrite(str(tmp_path / "opaque.png"), np.full((50, 60, 4), 255, np.uint8))  # no silhouette
    cv2.imwrite(str(tmp_path / "rgb.png"), np.full((50, 60, 3), 128, np.uint8))  # no alpha at all
    (found,) = load_cutouts([tmp_path])
    assert found.name == "ellipse.png" and found.photo
    ys, xs = np.nonzero(found.rgba[..., 3] > 128)
    assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (0, 0, *found.rgba.shape[:2])
    with pytest.raises(LoratError, match="not found"):
        load_cutouts([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoratError, match="no RGBA"):
        load_cutouts([tmp_path / "empty"])


def test_box_is_the_visible_mask_of_the_turning_object():
    """A long green ellipse that turns and stretches: every box edge touches the object's pixels."""
    target = Cutout(_ellipse(size=(150, 30)), "green", True)
    other = Cutout(_ellipse(colour=(250, 0, 250), size=(40, 40)), "magenta", False)
    all_four, three, boxes = 0, 0, 0
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for frame, box, _ in make_clip(rng, 12, [target], [other], [], size=(320, 240)):
            assert frame.shape == (240, 320, 3) and frame.dtype == np.uint8
            if box is None:
                continue
            x, y, w, h = box
            assert 0 <= x and 0 <= y and x + w <= 320 and y + h <= 240 and w > 0 and h > 0
            g = frame.astype(int)
            green = (g[..., 1] > g[..., 0] + 40) & (g[..., 1] > g[..., 2] + 40)
            edges = [green[y:y + h, x:x + 2], green[y:y + h, x + w - 2:x + w], green[y:y + 2, x:x + w],
                     green[y + h - 2:y + h, x:x + w]]
            sides = sum(e.any() for e in edges)
            all_four += sides == 4
            three += sides >= 3
            boxes += 1
    # a hand holding the object may hide one side (the box still covers it, as a human's would)
    assert boxes >= 30 and three >= 0.95 * boxes and all_four >= 0.6 * boxes


def test_written_clips_and_stills_make_training_pairs(tmp_path):
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    for k, colour in enumerate([(200, 120, 40), (40, 160, 220), (90, 200, 90)]):
        image = _ellipse(colour=colour, size=(80 + 20 * k, 50), noise=8, seed=k)
        cv2.imwrite(str(stamps / f"thing{k}.png"), cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA))
    out = tmp_path / "data"
    assert run_cli(main, [str(out), "--stamps", str(stamps), "--sequences", "2", "--frames", "6",
                          "--holdout", "0"]) == 0
    assert run_cli(main, [str(out), "--stamps", str(stamps), "--sequences", "2", "--frames", "1",
                          "--category", "still", "--holdout", "0"]) == 0
    sequences = read_dataset("lasot", str(out), "train")
    assert sorted(len(s) for s in sequences) == [1, 1, 6, 6]
    cfg = tiny_config()
    pairs = PairDataset([Source("lasot", sequences, 1.0)], cfg.model, cfg.tracking, cfg.train, 8, seed=0)
    pairs.set_epoch(0)
    for k in range(8):
        sample = pairs[k]
        assert sample["z"].shape[0] == 3 and sample["positive"].any()
    assert run_cli(main, [str(out), "--stamps", str(stamps), "--use", "heldout", "--holdout", "0"]) == 2


def test_holdout_split_is_deterministic():
    names = [f"animals/thing{k}.png" for k in range(400)]
    share = sum(held_out(n, 0.1) for n in names) / len(names)
    assert 0.05 < share < 0.15 and [held_out(n, 0.1) for n in names] == [held_out(n, 0.1) for n in names]


def test_init_weights_start_the_training_model(tmp_path):
    from lorat.training.trainer import load_init_weights

    cfg = config_from_dict(config_to_dict(tiny_config()) | {"train": {"finetune": "full"}})
    torch.manual_seed(1)
    start = build_training_model(cfg)
    path = save_model(start, cfg, tmp_path / "start.safetensors")
    torch.manual_seed(2)
    model = build_training_model(cfg)
    load_init_weights(model, cfg, path)
    for k, v in start.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    other = config_from_dict(config_to_dict(cfg) | {"model": config_to_dict(cfg)["model"] | {"search_size": 252}})
    with pytest.raises(LoratError, match="made for model"):
        load_init_weights(build_training_model(other), other, path)
    lora = config_from_dict(config_to_dict(cfg) | {"train": {"finetune": "lora"}})
    with pytest.raises(LoratError, match="finetune full"):
        load_init_weights(build_training_model(lora), lora, path)


# ----------------------------------------------------------------------------- variety (wide, grey, dark, logos)


def _pool():
    photos = [Cutout(_ellipse(colour=(40 * k, 90, 200 - 30 * k), size=(60, 50), noise=8, seed=k), f"t{k}", True)
              for k in range(3)]
    others = [Cutout(_ellipse(colour=(255, 0, 0), size=(30, 30)), "red", False)]
    return photos, others


def _clip(variety: Variety, seed: int = 0, frames: int = 12):
    photos, others = _pool()
    return list(make_clip(np.random.default_rng(seed), frames, photos, others, [], size=(320, 240), arm_odds=0.0,
                          variety=variety))


def test_defaults_draw_nothing_more():
    """Variety() off is the earlier generator: the same frames and boxes (earlier recipes reproduce)."""
    a, b = _clip(Variety()), _clip(Variety(grey=0.0, dark=0.0, salient=0.0))
    assert all(np.array_equal(fa, fb) and ba == bb for (fa, ba, _), (fb, bb, _) in zip(a, b, strict=True))


@pytest.mark.parametrize("aspect, check", [((4.0, 6.0), lambda r: r > 2.5), ((0.15, 0.25), lambda r: r < 0.4)])
def test_wide_and_tall_targets(aspect, check):
    ratios = []
    for seed in range(4):
        ratios += [w / h for _, box, _ in _clip(Variety(aspect=aspect, spin=0.0), seed) if box
                   for _, _, w, h in [box]]
    assert ratios and check(float(np.median(ratios))), ratios[:5]
    assert min(min(box[2:]) for seed in range(4) for _, box, _ in _clip(Variety(aspect=aspect, spin=0.0), seed)
               if box) >= 8  # the short side stays visible


def test_grey_and_dark_clips():
    grey = _clip(Variety(grey=1.0))
    assert all(np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 1], f[..., 2]) for f, _, _ in grey)
    plain, dark = _clip(Variety(), seed=3), _clip(Variety(dark=1.0), seed=3)
    assert np.mean([f.mean() for f, _, _ in dark]) < 0.5 * np.mean([f.mean() for f, _, _ in plain])
    assert [b for _, b, _ in plain] == [b for _, b, _ in dark]  # the light changes, the boxes do not


def test_low_detail_clips_keep_the_boxes_and_lose_fine_detail():
    plain, low = _clip(Variety(), seed=3), _clip(Variety(lowres=1.0), seed=3)
    assert [b for _, b, _ in plain] == [b for _, b, _ in low]
    detail = lambda clip: np.mean([cv2.Laplacian(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()  # noqa: E731
                                   for f, _, _ in clip])
    assert detail(low) < 0.5 * detail(plain)


def test_tilt_is_a_homography_that_reduces_to_the_affine_map():
    from lorat.data.cutouts import _affine, _tilted

    m = _affine(100.0, 80.0, 60, 40, 90.0, 50.0, 30.0, False)
    np.testing.assert_allclose(_tilted(m, 60, 40, 0.0, 0.0), np.vstack([m, [0, 0, 1]]), rtol=1e-5, atol=1e-4)
    h = _tilted(m, 60, 40, 50.0, 0.0)  # the plane swings about its vertical axis: one side nearer
    corners = cv2.perspectiveTransform(np.float32([[[0, 0], [0, 40], [60, 0], [60, 40]]]), h)[0]
    near, far = np.linalg.norm(corners[0] - corners[1]), np.linalg.norm(corners[2] - corners[3])
    assert near > 1.2 * far and abs(h[2, :2]).max() > 0
    centre = cv2.perspectiveTransform(np.float32([[[30, 20]]]), h)[0, 0]
    np.testing.assert_allclose(centre, (100, 80), atol=1e-3)


def test_tilted_targets_keep_their_mask_boxes():
    clip = _clip(Variety(tilt=60.0, spin=0.0), seed=1, frames=30)
    boxes = [b for _, b, _ in clip if b]
    assert len(boxes) == 30
    assert np.std([w / h for _, _, w, h in boxes]) > 0.05  # the outline changes as the plane swings


def test_a_salient_part_rides_inside_the_silhouette():
    from lorat.data.cutouts import _with_part

    photos, others = _pool()
    marked = _with_part(np.random.default_rng(0), photos[0], others)
    assert np.array_equal(marked.rgba[..., 3], photos[0].rgba[..., 3])  # the silhouette, hence the box, is the object's
    changed = (marked.rgba[..., :3] != photos[0].rgba[..., :3]).any(axis=2)
    assert 0 < changed.sum() < 0.25 * (photos[0].rgba[..., 3] > 128).sum()
    assert not changed[photos[0].rgba[..., 3] <= 128].any()


def test_variety_options_are_checked(tmp_path, capsys):
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    args = [str(tmp_path / "out"), "--stamps", str(stamps)]
    for bad, message in ((["--grey", "1.5"], "probability"), (["--aspect", "5,2"], "0 < MIN <= MAX"),
                         (["--spin", "400"], "[0, 180]"), (["--tilt", "80"], "[0, 75]"),
                         (["--lowres", "-1"], "probability")):
        assert run_cli(main, args + bad) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--aspect", "wide"])
    assert "expected MIN,MAX" in capsys.readouterr().err

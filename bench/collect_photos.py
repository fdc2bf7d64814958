"""Gather the real photographs that ship in packages, for ``python -m lorat.data.synthetic --photos``.

    python bench/collect_photos.py data/photos data/photos-heldout

Sources (all installable offline from the package registries): Debian ``opencv-doc``
(``/usr/share/doc/opencv-doc/examples/data``), ``scikit-image`` (``skimage.data``) and
``scikit-learn`` (``load_sample_images``). Calibration patterns, logos, drawings and text pages
of OpenCV are left out, and so are ``box.png`` / ``box_in_scene.png`` (a box, like the held-out
demo clip). A fixed set of photos goes to the held-out folder: clips generated from them score
the demo model on backgrounds and objects it never saw. No video clip is used.
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2

from lorat.errors import LoratError, run_cli

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_SKIP = ["box*", "left0*", "right0*", "left1*", "right1*", "chessboard*", "digits*", "mask*", "gradient*",
               "notes*", "imageText*", "*logo*", "detect_blob*", "ellipses*", "pic*", "ml.png", "aloeGT*", "graf*"]
SKIMAGE = ["astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina",
           "coins", "camera", "page", "text", "brick", "grass", "gravel", "moon", "clock", "colorwheel"]
HELD_OUT = ["ocv_fruits.jpg", "ocv_stuff.jpg", "ocv_smarties.png", "ski_coffee.png", "skl_1.jpg", "ocv_aero3.jpg",
            "ski_gravel.png", "ocv_home.jpg"]


def collect(train: Path, held_out: Path) -> tuple[int, int]:
    """Write the photos; returns (training, held-out) counts."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    if not OPENCV_DATA.is_dir():
        raise LoratError(f"{OPENCV_DATA} not found: install Debian's opencv-doc (apt-get install opencv-doc)")
    train.mkdir(parents=True, exist_ok=True)
    held_out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(OPENCV_DATA.glob("*")):
        if path.suffix in (".jpg", ".png") and not any(fnmatch.fnmatchcase(path.name, p) for p in OPENCV_SKIP):
            shutil.copyfile(path, train / f"ocv_{path.name}")
            written.append(f"ocv_{path.name}")
    for name in SKIMAGE:
        image = getattr(skimage.data, name)()
        if image.dtype != "uint8":
            continue
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        cv2.imwrite(str(train / f"ski_{name}.png"), cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2BGR))
        written.append(f"ski_{name}.png")
    for k, image in enumerate(load_sample_images().images):
        cv2.imwrite(str(train / f"skl_{k}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        written.append(f"skl_{k}.jpg")
    for name in HELD_OUT:
        if name in written:
            shutil.move(train / name, held_out / name)
    n_held = sum(name in written for name in HELD_OUT)
    return len(written) - n_held, n_held


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Gather packaged photographs for photo-textured synthetic clips.")
    parser.add_argument("train", type=Path, help="folder for the training photos")
    parser.add_argument("held_out", type=Path, help="folder for the held-out photos")
    args = parser.parse_args(argv)
    n_train, n_held = collect(args.train, args.held_out)
    print(f"wrote {n_train} photos to {args.train} and {n_held} to {args.held_out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""``python -m lorat.vot``: LoRAT as a tracker of the VOT toolkit (TraX protocol), answering boxes or masks.

The VOT toolkit (``pip install 'lorat[vot]'``) starts this command for every sequence and talks
to it over TraX, frame by frame, for one object or several. Register it in the workspace's
``trackers.ini`` (``--ini NAME`` prints the entry for this Python and these options):

    [LoRAT]
    label = LoRAT
    protocol = trax
    command = /usr/bin/python3 -m lorat.vot --weights /models/lorat_b224.safetensors
    timeout = 300

then ``vot test LoRAT``, ``vot evaluate --workspace ws LoRAT``, ``vot analysis --workspace ws LoRAT``.

The tracking is that of ``python -m lorat.track``: one model, every object of a sequence in one
batched step, ``lap`` assignment when objects compete (``--no-assignment``: independent objects,
as the official code). Initial regions may be rectangles, polygons or masks (their bounding box);
answers are rectangles (the official integer rounding) or, for objects given as masks (VOTS
stacks) or with ``--output mask``, frame-sized masks: SAM prompted with each box
(``--sam-weights sam_vit_h_4b8939.pth``, one image embedding per frame), or the box filled.
Each answer carries the score as the ``confidence`` property (long-term analyses read it). An object
the toolkit adds on a later frame that cannot be tracked (its region outside the frame, an empty mask,
a box on an object already tracked) is refused alone: a line in the log, an empty region with
confidence 0 for it on every frame, and the other objects go on being tracked.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorat.errors import LoratError, run_cli
from lorat.options import add_tracker_arguments
from lorat.vot.session import (
    OUTPUTS,
    Answer,
    Refused,
    Start,
    VotSession,
    check_inside,
    start_from_mask,
    start_from_points,
)

if TYPE_CHECKING:
    from lorat.tracking.tracker import Tracker
    from lorat.vot.masks import BoxMasker

__all__ = ["main", "serve", "trackers_ini", "check_tracker_name", "check_tracker_files"]

_INSTALL = "pip install 'lorat[vot]' (vot-toolkit and vot-trax)"
_IDENTIFIER = re.compile(r"[A-Za-z0-9_-]+")  # the toolkit's rule for tracker names
_FILE_OPTIONS = ("--weights", "--config", "--backbone-weights", "--phase1-weights", "--sam-weights")


def _note(message: str) -> None:
    """A line for the toolkit's log (stderr: stdout carries the protocol)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- TraX


def _trax() -> Any:
    try:
        import trax
        import trax.server  # noqa: F401  (the Server class lives there)
    except ImportError:
        raise LoratError(f"the VOT integration needs the TraX bindings, which are not installed: {_INSTALL}") from None
    except OSError as err:  # libtrax.so that cannot load
        raise LoratError(f"the TraX library (vot-trax) cannot be loaded: {err}") from None
    return trax


def _read_frame(images: dict, trax: Any) -> tuple[np.ndarray | None, str]:
    """The request's color image as (H, W, 3) uint8 RGB (None if it cannot be read), and its name."""
    import cv2

    image = images.get(trax.ImageChannel.COLOR) if images else None
    if image is None or image.type() != trax.Image.PATH:
        raise LoratError("the toolkit sent no color image file (only color images, given as paths, are supported)")
    path = image.path()
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    return (None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), path


def _start(region: Any, index: int, frame_size: tuple[int, int], trax: Any) -> Start:
    kind = region.type
    if kind == trax.Region.RECTANGLE:
        x, y, w, h = region.bounds()
        return start_from_points([(x, y), (x + w, y + h)], index)
    if kind == trax.Region.POLYGON:
        return start_from_points(list(region), index)
    if kind == trax.Region.MASK:
        return start_from_mask(region.array(), region.offset(), frame_size, index)
    raise LoratError(f"object {index + 1}: an initial region of type {kind!r} cannot be tracked")


def _new_objects(regions: Sequence[Any], known: int, frame_size: tuple[int, int], trax: Any) -> list[Start | Refused]:
    """The objects the toolkit adds on a later frame (VOTS). One that cannot be tracked (a region outside
    the frame, an empty mask, no area, an unknown type) is refused alone: the session logs a line and
    answers it with an empty region and score 0 (the toolkit's "not there"; it wants one answer per
    object), and goes on tracking the others -- ending the whole session would lose them all."""
    objects: list[Start | Refused] = []
    for k, region in enumerate(regions):
        try:
            objects.append(check_inside(_start(region, known + k, frame_size, trax), frame_size, known + k))
        except LoratError as err:
            objects.append(Refused(str(err), mask=region.type == trax.Region.MASK))
    return objects


def _encode(answer: Answer) -> Any:
    from trax.region import Mask, Rectangle

    if answer.mask is None:
        return Rectangle.create(*answer.box)
    rows, cols = np.flatnonzero(answer.mask.any(axis=1)), np.flatnonzero(answer.mask.any(axis=0))
    if len(rows) == 0:  # nothing left of the object: a one-pixel empty mask
        return Mask.create(np.zeros((1, 1), dtype=np.uint8))
    crop = answer.mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # the frame-sized mask, sent as its bounding crop
    return Mask.create(np.ascontiguousarray(crop, dtype=np.uint8), int(cols[0]), int(rows[0]))


def serve(session: VotSession, multiobject: bool, trax: Any) -> None:
    """Answer the toolkit until it quits. A :class:`LoratError` ends the session with its message."""
    from trax.server import Server

    server = Server([trax.Region.RECTANGLE, trax.Region.POLYGON, trax.Region.MASK], [trax.Image.PATH],
                    [trax.ImageChannel.COLOR], tracker_name="LoRAT",
                    tracker_description="LoRAT (ECCV 2024), lorat implementation", tracker_family="LoRAT",
                    multiobject=multiobject)
    started = False
    try:
        while True:
            try:
                request = server.wait()
            except trax.TraxException as err:
                raise LoratError(f"the TraX connection broke: {err}") from None
            if request.type == trax.TraxStatus.QUIT:
                break
            frame, name = _read_frame(request.image, trax)
            if request.type == trax.TraxStatus.INITIALIZE:
                if frame is None:
                    raise LoratError(f"cannot read the first frame {name}")
                starts = [check_inside(_start(r, k, frame.shape[:2], trax), frame.shape[:2], k)
                          for k, (r, _) in enumerate(request.objects)]
                answers, started = session.initialize(frame, starts), True
            else:
                if not started:
                    raise LoratError("the toolkit sent a frame before initialising any object")
                if frame is None and request.objects:
                    raise LoratError(f"new objects were given on a frame that cannot be read: {name}")
                if frame is None:
                    _note(f"warning: cannot read {name}; the last regions are repeated with confidence 0")
                    answers = session.frame(None)
                else:
                    regions = [r for r, _ in request.objects or []]
                    answers = session.frame(frame, _new_objects(regions, len(session.last), frame.shape[:2], trax))
            server.status([(_encode(a), {"confidence": f"{a.score:.4f}"}) for a in answers])
    except LoratError as err:
        server.quit(reason=str(err))
        raise
    server.quit()


# ----------------------------------------------------------------------------- the command


def trackers_ini(name: str, argv: Sequence[str]) -> str:
    """A ``trackers.ini`` entry that runs ``python -m lorat.vot`` with ``argv`` under this Python; file
    arguments become absolute (the toolkit starts trackers in a temporary folder).

    Raises:
        LoratError: ``name`` is not a tracker name the toolkit takes, or ``argv`` holds ``--ini`` (the
            command would print an entry instead of tracking).
    """
    check_tracker_name(name)
    if any(_is_ini(arg) for arg in argv):
        raise LoratError("--ini prints a trackers.ini entry and exits: a tracker command that holds it would not "
                         "track; leave it out of the tracker options")
    args, absolute = list(argv), []
    for k, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        if eq and _is_option(option, _FILE_OPTIONS) and Path(value).exists():
            arg = f"{option}={Path(value).resolve()}"
        elif k and _is_option(args[k - 1], _FILE_OPTIONS) and Path(arg).exists():
            arg = str(Path(arg).resolve())
        absolute.append(arg)
    command = shlex.join([sys.executable, "-m", "lorat.vot", *absolute])
    return (f"[{name}]\nlabel = {name}\nprotocol = trax\ncommand = {command}\n"
            f"# seconds the toolkit waits for an answer, the model and SAM loading included\ntimeout = 300\n\n")


def check_tracker_name(name: str) -> str:
    """``name``, if the toolkit takes it as a tracker name (its identifier rule) and ``vot test NAME`` can
    name it on a command line (no leading '-', which would read as an option).

    Raises:
        LoratError: any other name.
    """
    if not _IDENTIFIER.fullmatch(name) or name.startswith("-"):
        raise LoratError(f"--ini {name!r}: a VOT tracker name is letters, digits, '_' and '-', not starting "
                         f"with '-'")
    return name


def check_tracker_files(args: argparse.Namespace) -> None:
    """The files the tracker options name exist (a named model such as LoRAT-B-224 for ``--weights``, a
    bundled config name such as b224 for ``--config`` are fine): an entry with a missing file would
    only fail when the toolkit runs it.

    Raises:
        LoratError: naming the option and the missing file.
    """
    from lorat.checkpoint.hub import MODELS
    from lorat.files import bundled_config

    for option in _FILE_OPTIONS:
        value = getattr(args, option.removeprefix("--").replace("-", "_"), None)
        if value is None or Path(value).is_file():
            continue
        if option == "--weights" and str(value).lower() in MODELS:
            continue
        if option == "--config" and bundled_config(str(value)) is not None:
            continue
        what = "a folder, not a file" if Path(value).is_dir() else "no such file"
        raise LoratError(f"{option} {value}: {what}" + (" (nor a named model such as LoRAT-B-224)"
                                                       if option == "--weights" else ""))


def _is_option(arg: str, options: Sequence[str]) -> bool:
    """Whether ``arg`` is one of ``options``, as argparse reads it: the whole flag or a prefix of it
    (``--weights``, ``--w``), optionally with ``=VALUE``. (An abbreviation that fits another option as
    well never gets here: argparse refuses it.)"""
    option = arg.partition("=")[0]
    return option.startswith("--") and len(option) > 2 and any(o.startswith(option) for o in options)


def _is_ini(arg: str) -> bool:
    """Whether ``arg`` is the ``--ini`` option (``--ini``, ``--in``, ``--i``, with or without ``=VALUE``)."""
    return _is_option(arg, ("--ini",))


def _strip_ini(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif _is_ini(arg):
            skip = "=" not in arg
        else:
            out.append(arg)
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lorat.vot", description=__doc__.split("\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--output", choices=OUTPUTS, default="auto",
                   help="answer with boxes, masks, or auto: masks for objects the toolkit gave as masks (VOTS "
                        "stacks), boxes otherwise (default auto)")
    p.add_argument("--sam-weights", type=Path, metavar="FILE",
                   help="Segment Anything checkpoint (sam_vit_{b,l,h}_*.pth; the variant is read from the file) "
                        "that turns boxes into masks (default: the box filled)")
    p.add_argument("--single-object", action="store_true",
                   help="tell the toolkit to run one object per tracker process (default: all objects of a "
                        "sequence in one process, one batched step per frame)")
    p.add_argument("--ini", metavar="NAME",
                   help="print a trackers.ini entry named NAME that runs this command with the other options, "
                        "then exit")
    add_tracker_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(argv)
    if args.ini is not None:
        check_tracker_name(args.ini)
        check_tracker_files(args)
        print(trackers_ini(args.ini, _strip_ini(argv)), end="")
        return 0
    if args.sam_weights is not None and not args.sam_weights.is_file():
        raise LoratError(f"SAM checkpoint {args.sam_weights} not found")
    trax = _trax()
    if sys.stdin.isatty():
        raise LoratError("python -m lorat.vot talks TraX to the VOT toolkit, which starts it: register it in "
                         "trackers.ini (print an entry with --ini NAME) and run vot test NAME")
    with redirect_stdout(sys.stderr):  # a stray print must not reach the protocol on stdout
        from lorat.tracking.tracker import tracker_from_arguments

        tracker = tracker_from_arguments(args, say=_note)
        masker = _masker(args, tracker)
        _note(f"LoRAT {tracker.config.model.variant} on {tracker.device} for the VOT toolkit: "
              f"{'one object' if args.single_object else 'all objects'} per process, output {args.output}")
        serve(VotSession(tracker, masker, args.output, note=_note), multiobject=not args.single_object, trax=trax)
    return 0


def _masker(args: argparse.Namespace, tracker: Tracker) -> BoxMasker:
    from lorat.vot.masks import SamMasker, filled_boxes

    if args.sam_weights is not None:
        masker = SamMasker.from_file(args.sam_weights, tracker.device)
        _note(f"masks: SAM {masker.name} from {args.sam_weights}, prompted with each box")
        return masker
    if args.output != "box":
        _note("note: no --sam-weights given: where masks are asked for, the mask is the box filled "
              "(give a SAM checkpoint for segmentation masks)")
    return filled_boxes


if __name__ == "__main__":
    raise SystemExit(run_cli(main))

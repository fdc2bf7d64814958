"""LoRAT web demo: upload a video, draw the target box(es) on the first frame, track.

    python apps/gradio_app.py [--host 0.0.0.0] [--port 7860] [--weights FILE ...] [--device cpu]

Settings also come from the environment: ``LORAT_WEIGHTS`` (comma-separated weight files),
``LORAT_DEVICE``, ``LORAT_HOST``, ``LORAT_PORT``, ``LORAT_MAX_FRAMES`` (default 3000) and
``LORAT_MAX_UPLOAD_MB`` (default 200). Models are loaded once at start-up and shared by every
request; requests wait in Gradio's queue. Frames are read and written one at a time, so long
videos do not fill memory. Uses only the public ``lorat`` API.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import gradio as gr
import numpy as np

import lorat
from lorat.checkpoint import default_weights, default_weights_notice
from lorat.video import VideoWriter, draw_targets, open_source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "box.mp4"
EXAMPLE_BOX = (257, 160, 141, 175)  # the box in box.mp4's first frame (assets/box_pseudo_gt.txt)


class Models:
    """Weight files loaded once and shared; ``get`` is thread-safe."""

    def __init__(self, weights: Sequence[str], device: str):
        self.device = device
        self.paths = {Path(w).stem: Path(w) for w in weights}
        self._loaded: dict[str, tuple[lorat.LoRAT, lorat.Config]] = {}
        self._lock = threading.Lock()
        for name in self.paths:  # load at start-up: a bad file fails now, not on the first request
            self.get(name)

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def get(self, name: str) -> tuple[lorat.LoRAT, lorat.Config]:
        with self._lock:
            if name not in self._loaded:
                tracker = lorat.Tracker.from_pretrained(self.paths[name], device=self.device)
                self._loaded[name] = (tracker.model, tracker.config)
            return self._loaded[name]


def _draw_selection(frame: np.ndarray, boxes: list, pending) -> np.ndarray:
    out = draw_targets(frame, boxes, [1.0] * len(boxes)) if boxes else frame.copy()
    if pending is not None:
        cv2.drawMarker(out, tuple(int(v) for v in pending), (255, 220, 0), cv2.MARKER_CROSS, 18, 2)
    return out


def load_first_frame(video: str | None):
    """New video: show its first frame for drawing; reset the boxes."""
    if not video:
        return None, {"boxes": [], "pending": None, "frame": None}, "Upload a video or pick the example."
    try:
        source = open_source(video)
    except lorat.LoratError as err:
        raise gr.Error(f"Cannot read this video: {err}") from None
    try:
        _, frame = next(iter(source))
        info = f"{source.width}x{source.height}, {source.frame_count or '?'} frames at {source.fps:.0f} fps. "
    finally:
        source.close()
    state = {"boxes": [], "pending": None, "frame": frame}
    return frame, state, info + "Click two opposite corners of the target (repeat for more targets)."


def click(state: dict, evt: gr.SelectData):
    """Two clicks make one box (corners in either order)."""
    if state.get("frame") is None:
        raise gr.Error("Load a video first.")
    x, y = (float(v) for v in evt.index)
    if state["pending"] is None:
        state["pending"] = (x, y)
        message = f"First corner at ({x:.0f}, {y:.0f}); click the opposite corner."
    else:
        (x0, y0), state["pending"] = state["pending"], None
        box = [min(x0, x), min(y0, y), abs(x - x0), abs(y - y0)]
        if box[2] < 2 or box[3] < 2:
            raise gr.Error("That box is too small; click two opposite corners.")
        state["boxes"].append(box)
        message = f"{len(state['boxes'])} target(s): " + "; ".join(
            f"#{i + 1} {', '.join(f'{v:.0f}' for v in b)}" for i, b in enumerate(state["boxes"]))
    return _draw_selection(state["frame"], state["boxes"], state["pending"]), state, message


def add_typed_box(text: str, state: dict):
    """A box typed as x,y,w,h (for precise placement)."""
    if state.get("frame") is None:
        raise gr.Error("Load a video first.")
    try:
        box = [float(v) for v in text.replace(",", " ").split()]
        assert len(box) == 4 and box[2] > 0 and box[3] > 0
    except (ValueError, AssertionError):
        raise gr.Error("Type the box as x,y,w,h with a positive width and height.") from None
    state["boxes"].append(box)
    return _draw_selection(state["frame"], state["boxes"], state["pending"]), state, \
        f"{len(state['boxes'])} target(s) selected."


def clear_boxes(state: dict):
    state["boxes"], state["pending"] = [], None
    frame = state.get("frame")
    return (frame.copy() if frame is not None else None), state, "Boxes cleared."


def _score_plot(scores: np.ndarray, threshold: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6), dpi=100)
    for k in range(scores.shape[1]):
        ax.plot(scores[:, k], linewidth=1.5, label=f"target #{k + 1}")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"lost below {threshold:.2f}")
    ax.set(xlabel="frame", ylabel="score", ylim=(0, 1.02), xlim=(0, max(len(scores) - 1, 1)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def make_track_fn(models: Models, max_frames: int):
    def track(video: str | None, state: dict, model_name: str, threshold: float,
              progress=gr.Progress()):  # noqa: B008 (Gradio injects the progress tracker this way)
        """Track every selected target through the video; stream frames in and out."""
        if not video:
            raise gr.Error("Upload a video or pick the example first.")
        boxes = (state or {}).get("boxes") or []
        if not boxes:
            raise gr.Error("Select at least one target: click two corners on the first frame.")
        model, config = models.get(model_name)
        tracker = lorat.Tracker(model, config)
        try:
            source = open_source(video)
        except lorat.LoratError as err:
            raise gr.Error(f"Cannot read this video: {err}") from None
        if source.frame_count and source.frame_count > max_frames:
            source.close()
            raise gr.Error(f"The video has {source.frame_count} frames; this demo accepts at most {max_frames}.")
        out = Path(tempfile.mkdtemp(prefix="lorat_"))
        total = source.frame_count or max_frames
        rows, all_scores = [], []
        writer = VideoWriter(out / "tracked.mp4", source.fps, (source.width, source.height))
        try:
            for index, frame in source:
                if index >= max_frames:
                    break
                if frame is None:
                    continue
                try:
                    results = tracker.init(frame, boxes) if index == 0 else tracker.track_all(frame)
                except lorat.LoratError as err:
                    raise gr.Error(str(err)) from None
                writer.write(draw_targets(frame, [r.box for r in results], [r.score for r in results], threshold))
                rows.extend((index + 1, k + 1, *r.box, r.score) for k, r in enumerate(results))
                all_scores.append([r.score for r in results])
                progress((index + 1) / total, desc=f"frame {index + 1}/{total}")
        finally:
            writer.close()
            source.close()
        if not all_scores:
            raise gr.Error("No frame of this video could be decoded.")
        files = []
        for k in range(len(boxes)):
            path = out / (f"boxes_{k + 1}.txt" if len(boxes) > 1 else "boxes.txt")
            path.write_text("".join("\t".join(f"{v:.3f}" for v in r[2:6]) + "\n" for r in rows if r[1] == k + 1))
            files.append(str(path))
        with open(out / "boxes.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "target", "x", "y", "w", "h", "score"])
            w.writerows([r[0], r[1], *(f"{v:.3f}" for v in r[2:6]), f"{r[6]:.4f}"] for r in rows)
        files += [str(out / "boxes.csv"), str(out / "tracked.mp4")]
        scores = np.array(all_scores)
        lost = int((scores[1:] < threshold).any(axis=1).sum())
        message = (f"Tracked {len(boxes)} target(s) over {len(scores)} frames; "
                   f"{lost} frame(s) with a target under the threshold.")
        return str(out / "tracked.mp4"), _score_plot(scores, threshold), files, message

    return track


def build_app(models: Models, max_frames: int, note: str = "") -> gr.Blocks:
    """The Blocks app; ``note`` is shown under the title (e.g. which model is loaded)."""
    with gr.Blocks(title="LoRAT tracker") as demo:
        gr.Markdown("# LoRAT visual object tracker\nUpload a video (or pick the example), click two opposite "
                    "corners of the target on the first frame, press **Track**." + (f"\n\n{note}" if note else ""))
        state = gr.State({"boxes": [], "pending": None, "frame": None})
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"], elem_id="video-input")
                if EXAMPLE.is_file():
                    gr.Examples([[str(EXAMPLE)]], inputs=[video], label="Example (OpenCV's box.mp4)")
                first = gr.Image(label="First frame: click two corners per target", interactive=False,
                                 elem_id="first-frame")
                with gr.Row():
                    typed = gr.Textbox(label="or type a box x,y,w,h", scale=3, elem_id="typed-box")
                    add = gr.Button("Add box", scale=1, elem_id="add-box")
                    clear = gr.Button("Clear boxes", scale=1)
                with gr.Row():
                    model = gr.Dropdown(models.names, value=models.names[0], label="Model")
                    threshold = gr.Slider(0, 1, value=0.3, step=0.05, label="Lost-target threshold")
                run = gr.Button("Track", variant="primary", elem_id="track")
                status = gr.Markdown(elem_id="status")
            with gr.Column():
                result = gr.Video(label="Tracked video", elem_id="result-video")
                plot = gr.Plot(label="Score over time")
                downloads = gr.File(label="Downloads (boxes: pytracking text and CSV; video)", file_count="multiple",
                                    elem_id="downloads")
        video.change(load_first_frame, video, [first, state, status], api_name="load_first_frame")
        first.select(click, state, [first, state, status], api_name="click")
        add.click(add_typed_box, [typed, state], [first, state, status], api_name="add_typed_box")
        clear.click(clear_boxes, state, [first, state, status], api_name="clear_boxes")
        run.click(make_track_fn(models, max_frames), [video, state, model, threshold],
                  [result, plot, downloads, status], concurrency_limit=1, api_name="track")
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(description="LoRAT web demo")
    p.add_argument("--host", default=env.get("LORAT_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env.get("LORAT_PORT", "7860")))
    p.add_argument("--weights", nargs="+", default=[w for w in env.get("LORAT_WEIGHTS", "").split(",") if w],
                   help="single-file weights (several: a model menu); default: the bundled demo model")
    p.add_argument("--device", default=env.get("LORAT_DEVICE", "auto"))
    p.add_argument("--max-frames", type=int, default=int(env.get("LORAT_MAX_FRAMES", "3000")))
    p.add_argument("--max-upload-mb", type=int, default=int(env.get("LORAT_MAX_UPLOAD_MB", "200")))
    args = p.parse_args(argv)
    note = ""
    try:
        if not args.weights:
            args.weights = [str(default_weights())]
            print(default_weights_notice(Path(args.weights[0])))
            if not env.get("LORAT_WEIGHTS"):
                note = (f"Model: the bundled demo model `{Path(args.weights[0]).name}`, a small CPU model trained "
                        f"for this demo, not the paper's (see the README for the official weights).")
        models = Models(args.weights, args.device)
    except lorat.LoratError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    demo = build_app(models, args.max_frames, note)
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb}mb",
                show_error=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

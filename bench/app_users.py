"""The web demo shared by 1, 2 and 4 simultaneous users: total and per-user frames per second.

    python bench/app_users.py [--users 1 2 4] [--frames 120]

Starts ``apps/gradio_app.py`` with the bundled model, then each user (a thread with its own
``gradio_client`` session) loads assets/box.mp4, types its box and presses Track, all at once. Total =
all frames tracked / wall time from the first request to the last answer; per user = its frames / its
own wall time (queueing included).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIP = ROOT / "assets" / "box.mp4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user(url: str, results: list, start: threading.Barrier) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    client.predict(handle_file(str(CLIP)), api_name="/load_first_frame")
    client.predict(0, api_name="/start_frame")
    client.predict("290,14,308,228", api_name="/add_typed_box")
    start.wait()
    began = time.perf_counter()
    _, _, _, message = client.predict(handle_file(str(CLIP)), "lorat_demo", 0.3, api_name="/track")
    frames = int(message.split(" over ")[1].split(" frames")[0])
    results.append((began, time.perf_counter(), frames))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=120, help="the app's --max-frames (frames per request)")
    args = parser.parse_args(argv)
    port = _free_port()
    env = os.environ | {"LORAT_MAX_FRAMES": str(args.frames)}
    app = subprocess.Popen([sys.executable, str(ROOT / "apps" / "gradio_app.py"), "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        print("| users | total frames/s | per user frames/s (mean) | slowest user's wait (s) |\n|---|---|---|---|")
        for n in args.users:
            results: list = []
            start = threading.Barrier(n)
            threads = [threading.Thread(target=_user, args=(url, results, start)) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            first, last = min(r[0] for r in results), max(r[1] for r in results)
            total = sum(r[2] for r in results) / (last - first)
            per_user = sum(r[2] / (r[1] - r[0]) for r in results) / n
            print(f"| {n} | {total:.1f} | {per_user:.1f} | {max(r[1] - r[0] for r in results):.1f} |", flush=True)
    finally:
        app.terminate()
        app.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Named-model downloads against awkward and hostile servers (the local server of test_hub.py: never the internet):
two processes fetching one file, cache folders that cannot be created, bodies larger than the model, range
answers that cannot resume, stalls and redirect loops. Each gives one WeightsError line and loses nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorat.checkpoint import hub
from lorat.checkpoint.loader import load_model
from lorat.config import load_config
from lorat.errors import WeightsError, run_cli

from . import test_hub
from .helpers import ADDRESS_SPACE_CAP_GB
from .test_hub import CHECKPOINT_PATH, DINOV2_PATH, TINY, TINY_NAME

server, tiny_hub = test_hub.server, test_hub.tiny_hub  # the fixtures
PIECE = 1 << 16
CHECKPOINT_LIMIT_MB = 1.3  # hub.checkpoint_limit of the tiny config, in MB (checked below)


def _cached(tmp: Path) -> Path:
    return tmp / "lorat-home" / TINY_NAME / "model.safetensors"


def _partial(tmp: Path) -> Path:
    return tmp / "lorat-home" / TINY_NAME / "model.partial.safetensors"


def _cap() -> None:
    import resource

    limit = int(ADDRESS_SPACE_CAP_GB * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# --- two processes, one file -----------------------------------------------------------------------------------

_FETCHER = """
import sys
from pathlib import Path
from lorat.checkpoint import hub
from lorat.errors import run_cli

url, dest = sys.argv[1], Path(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
sys.exit(run_cli(lambda argv: print(hub.fetch(url, dest, lambda p: None, "the LoRAT-Tiny checkpoint", progress=False))))
"""


def test_two_processes_fetching_one_model_share_one_download(tiny_hub, server):
    """hub.fetch (what resolve_named and dinov2_weights download with) in two processes: the second one starts
    while the first downloads (without the lock it resumed the same .partial file and died at the end)."""
    server.delay = 0.5  # 2.5 s for the checkpoint: the downloads would overlap
    cached = _cached(tiny_hub)
    fetchers = [subprocess.Popen([sys.executable, "-c", _FETCHER, server.url + CHECKPOINT_PATH, str(cached)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=_cap)
                for _ in range(2)]
    try:
        for p in fetchers:  # both imported everything: start the second while the first downloads
            assert p.stdout.readline().strip() == "ready"
        for p in fetchers:
            p.stdin.write("go\n")
            p.stdin.flush()
            deadline = time.monotonic() + 10
            while not server.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.6)  # a few pieces arrived
        results = [p.communicate(timeout=60) for p in fetchers]
    finally:
        for p in fetchers:
            p.kill()
    for p, (out, err) in zip(fetchers, results, strict=True):
        assert p.returncode == 0 and "Traceback" not in err and out.strip() == str(cached), err
    notes = [line for _, err in results for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "another process is downloading the LoRAT-Tiny checkpoint" in notes[0]
    assert [path for path, _ in server.requests].count(CHECKPOINT_PATH) == 1  # the second one used the first's file
    assert cached.read_bytes() == (TINY / "lorat_trainable.safetensors").read_bytes()
    assert not list(tiny_hub.rglob("*.partial*"))


# --- cache folders that cannot be created ----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["under /proc", "a regular file"])
def test_lorat_home_that_cannot_be_created_says_how_to_choose_another(tiny_hub, monkeypatch, capsys, where):
    from lorat.track import main

    home = "/proc/lorat-home" if where == "under /proc" else str(tiny_hub / "a-file")
    (tiny_hub / "a-file").write_text("not a folder")
    monkeypatch.setenv("LORAT_HOME", home)
    args = [str(TINY / "sequence"), "--weights", TINY_NAME, "--init", "76,77,40,38", "--device", "cpu"]
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot create the cache folder {home}/{TINY_NAME}" in err[0], err
    assert "set LORAT_HOME to a folder you can write to" in err[0]


def test_torch_home_that_cannot_be_created_says_how_to_choose_another(tiny_hub, monkeypatch):
    _cached(tiny_hub).parent.mkdir(parents=True)
    _cached(tiny_hub).write_bytes((TINY / "lorat_trainable.safetensors").read_bytes())
    (tiny_hub / "a-file").write_text("not a folder")
    monkeypatch.setenv("TORCH_HOME", str(tiny_hub / "a-file"))
    with pytest.raises(WeightsError, match=rf"cannot create the cache folder {tiny_hub}/a-file/hub/checkpoints .*"
                                           r"set TORCH_HOME to a folder you can write to"):
        load_model(TINY_NAME)


# --- bodies larger than the model ------------------------------------------------------------------------------

class Endless:
    """A body of ``most`` bytes (never ending, for a client: more than the socket buffers hold), announced as
    ``length`` when given; ``hung_up`` is set when the client closed the connection before its end."""

    def __init__(self, length: int | None = None, most: int = 48 << 20):
        self.length, self.most, self.sent, self.hung_up = length, most, 0, threading.Event()

    def __call__(self, handler, body):
        handler.send_response(200)
        if self.length is not None:
            handler.send_header("Content-Length", str(self.length))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            while self.sent < self.most:
                handler.wfile.write(b"\0" * PIECE)
                self.sent += PIECE
        except OSError:
            self.hung_up.set()
            raise


def test_size_limits_of_the_tiny_and_official_models():
    tiny, small = load_config(TINY / "config.yaml").model, load_config("s224").model
    assert (TINY / "lorat_trainable.safetensors").stat().st_size < hub.checkpoint_limit(tiny) < 1.4e6
    assert round(hub.checkpoint_limit(tiny) / 2**20, 1) == CHECKPOINT_LIMIT_MB
    assert (TINY / "dinov2_backbone.pth").stat().st_size < hub.dinov2_limit(tiny) < 3e6
    # LoRAT-S-224: 22.5 MB of float32 trainable tensors
    assert 22.5 * 2**20 < hub.checkpoint_limit(small) < 26 * 2**20


@pytest.mark.parametrize("path", [CHECKPOINT_PATH, DINOV2_PATH])
def test_endless_body_stops_at_the_size_limit_and_is_removed(tiny_hub, server, path):
    server.hostile[path] = endless = Endless()
    if path == DINOV2_PATH:  # the checkpoint is cached: only DINOv2 is downloaded
        _cached(tiny_hub).parent.mkdir(parents=True)
        _cached(tiny_hub).write_bytes((TINY / "lorat_trainable.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"sent more than \d\.\d MB for the .*, more than its config allows: "
                                           r"stopped, and the partial download removed; or .* put it at") as info:
        load_model(TINY_NAME)
    assert "\n" not in str(info.value)
    assert endless.hung_up.wait(20)  # the client stopped reading (the socket buffers took some more)
    assert not [p for p in tiny_hub.rglob("*") if p.is_file() and not p.name.endswith(".lock")
                and p != _cached(tiny_hub)]


def test_announced_size_over_the_limit_is_refused_before_reading(tiny_hub, server):
    server.hostile[CHECKPOINT_PATH] = Endless(length=10**10, most=4 << 20)
    with pytest.raises(WeightsError, match=rf"announces 9536\.7 MB for the {TINY_NAME} checkpoint, more than the "
                                           rf"{CHECKPOINT_LIMIT_MB} MB its config allows: refused; or"):
        load_model(TINY_NAME)
    assert not _partial(tiny_hub).exists()
    assert [p for p, _ in server.requests].count(CHECKPOINT_PATH) == 1


# --- range answers ---------------------------------------------------------------------------------------------

def _answer(status: int, content_range: str | None, whole: bool = False):
    """Answer every request with ``status``, ``Content-Range`` and the whole body (or none)."""

    def answer(handler, body):
        payload = body if whole else b""
        handler.send_response(status)
        if content_range is not None:
            handler.send_header("Content-Range", content_range.format(n=len(body)))
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    return answer


def _half_partial(tmp: Path, content: bytes | None = None) -> bytes:
    whole = (TINY / "lorat_trainable.safetensors").read_bytes()
    content = whole[:len(whole) // 2] if content is None else content
    _partial(tmp).parent.mkdir(parents=True)
    _partial(tmp).write_bytes(content)
    return content


@pytest.mark.parametrize("answer", [
    pytest.param(_answer(416, "bytes */{n}"), id="416 for another size"),
    pytest.param(_answer(416, None), id="416 without a size"),
    pytest.param(_answer(206, "bytes 0-{n}/{n}", whole=True), id="206 from another start"),
])
def test_server_that_cannot_resume_keeps_the_partial_file(tiny_hub, server, answer):
    kept = _half_partial(tiny_hub)
    server.hostile[CHECKPOINT_PATH] = answer
    with pytest.raises(WeightsError, match=r"cannot resume the partial download .*model\.partial\.safetensors .*"
                                           r"delete .*model\.partial\.safetensors to download from the start"):
        load_model(TINY_NAME)
    assert _partial(tiny_hub).read_bytes() == kept
    assert not _cached(tiny_hub).exists()


def test_416_for_the_size_we_have_means_complete(tiny_hub, server):
    whole = _half_partial(tiny_hub, (TINY / "lorat_trainable.safetensors").read_bytes())
    server.hostile[CHECKPOINT_PATH] = _answer(416, "bytes */{n}")
    load_model(TINY_NAME)
    assert _cached(tiny_hub).read_bytes() == whole and not _partial(tiny_hub).exists()


def test_server_ignoring_the_range_starts_over(tiny_hub, server):
    _half_partial(tiny_hub, b"x" * 1000)  # not the start of the file: appending to it would corrupt it
    server.hostile[CHECKPOINT_PATH] = _answer(200, None, whole=True)
    load_model(TINY_NAME)
    assert server.requests[0] == (CHECKPOINT_PATH, "bytes=1000-")
    assert _cached(tiny_hub).read_bytes() == (TINY / "lorat_trainable.safetensors").read_bytes()


# --- stalls and redirect loops ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [0, PIECE], ids=["nothing-received", "some-bytes-received"])
def test_a_stalled_download_keeps_what_arrived_and_no_empty_partial_file(tiny_hub, server, monkeypatch, sent):
    monkeypatch.setattr(hub, "_TIMEOUT", 0.5)
    resume = threading.Event()

    def stall(handler, body):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if sent and handler.headers.get("Range") is None:
            handler.wfile.write(body[:sent])
        handler.wfile.flush()
        resume.wait(10)

    server.hostile[CHECKPOINT_PATH] = stall
    try:
        with pytest.raises(WeightsError, match=rf"cannot download the {TINY_NAME} checkpoint from .* \(timed out\)"):
            load_model(TINY_NAME)
    finally:
        resume.set()
    if sent:  # kept for a resume
        assert _partial(tiny_hub).read_bytes() == (TINY / "lorat_trainable.safetensors").read_bytes()[:sent]
    else:
        assert not _partial(tiny_hub).parent.exists() or not list(_partial(tiny_hub).parent.glob("*.partial*"))


def test_redirect_loop_gives_one_error_line(tiny_hub, server, capsys):
    from lorat.track import main

    def loop(handler, body):
        handler.send_response(302)
        handler.send_header("Location", handler.path)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    server.hostile[CHECKPOINT_PATH] = loop
    args = [str(TINY / "sequence"), "--weights", TINY_NAME, "--init", "76,77,40,38", "--device", "cpu"]
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 302" in err[0] and "redirect" in err[0] and "put it at" in err[0], err
    assert not _partial(tiny_hub).exists()


"""Named models and downloads (lorat/hub.py), served by a local HTTP server on 127.0.0.1: never the internet."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from lorat.checkpoint import hub
from lorat.checkpoint.loader import load_model
from lorat.errors import WeightsError, run_cli

TINY = Path(__file__).parent / "fixtures" / "official-tiny"
TINY_NAME = "LoRAT-Tiny"
TINY_RELEASE = "dinov2_vitt14"
DINOV2_PATH = f"/dinov2/{TINY_RELEASE}/{TINY_RELEASE}_pretrain.pth"
CHECKPOINT_PATH = f"/{TINY_NAME}/model.safetensors"


class Server:
    """Serves ``files`` (URL path -> bytes) with range requests; ``cut`` paths send half their body on the
    first request, then close the connection (an interrupted download); ``hostile`` paths are answered by
    ``hostile[path](handler, body)`` instead (see test_hub_hostile.py); ``delay``: seconds between 64 KB
    pieces of a body (a slow server)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.hostile: dict[str, Callable[[BaseHTTPRequestHandler, bytes | None], None]] = {}
        self.delay = 0.0
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if self.path in server.hostile:
                    try:
                        server.hostile[self.path](self, body)
                    except OSError:  # the client hung up: what a hostile answer may well cause
                        self.close_connection = True
                    return
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if self.path in server.cut:
                    server.cut.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                try:
                    for i in range(start, len(body), 1 << 16):
                        self.wfile.write(body[i:i + (1 << 16)])
                        time.sleep(server.delay)
                except OSError:  # the client hung up
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    s.files = {DINOV2_PATH: (TINY / "dinov2_backbone.pth").read_bytes(),
               CHECKPOINT_PATH: (TINY / "lorat_trainable.safetensors").read_bytes()}
    yield s
    s.close()


@pytest.fixture
def tiny_hub(monkeypatch, tmp_path, server):
    """A named tiny model whose files the local server mirrors; caches in tmp_path."""
    monkeypatch.setitem(hub.MODELS, TINY_NAME.lower(), hub.NamedModel(TINY_NAME, str(TINY / "config.yaml")))
    monkeypatch.setitem(hub._DINOV2, (96, 2), TINY_RELEASE)
    monkeypatch.setenv("LORAT_MIRROR", server.url)
    monkeypatch.setenv("LORAT_HOME", str(tmp_path / "lorat-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("LORAT_OFFLINE", raising=False)
    return tmp_path


def _outputs(model) -> dict:
    from safetensors.torch import load_file

    ref = load_file(TINY / "forward.safetensors")
    with torch.inference_mode():
        return model(ref["z"], ref["x"], ref["z_feat_mask"])


def test_named_model_downloads_checks_and_caches(tiny_hub, server, monkeypatch):
    model, config = load_model(TINY_NAME)
    direct, _ = load_model(TINY / "lorat_trainable.safetensors", config, TINY / "dinov2_backbone.pth")
    for key, value in _outputs(direct).items():
        assert torch.equal(_outputs(model)[key], value)
    assert (tiny_hub / "lorat-home" / TINY_NAME / "model.safetensors").is_file()
    assert (tiny_hub / "torch-home" / "hub" / "checkpoints" / f"{TINY_RELEASE}_pretrain.pth").is_file()
    assert not list(tiny_hub.rglob("*.partial*"))
    # cached: no request at all, even offline and with the server gone
    count = len(server.requests)
    monkeypatch.setenv("LORAT_OFFLINE", "1")
    monkeypatch.delenv("LORAT_MIRROR")
    server.close()
    load_model(TINY_NAME)
    assert len(server.requests) == count


def test_interrupted_download_is_resumed_never_used_half(tiny_hub, server):
    server.cut = {CHECKPOINT_PATH, DINOV2_PATH}
    load_model(TINY_NAME)
    ranges = [r for path, r in server.requests if path == CHECKPOINT_PATH]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    cached = tiny_hub / "lorat-home" / TINY_NAME / "model.safetensors"
    assert cached.read_bytes() == (TINY / "lorat_trainable.safetensors").read_bytes()


def _small_dinov2() -> bytes:
    """A DINOv2 file (one block, no position grid) smaller than the tiny checkpoint's size limit."""
    sd = torch.load(TINY / "dinov2_backbone.pth", map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.1.") and k != "pos_embed"}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("content", ["garbage", "wrong kind", "too large"])
def test_corrupt_or_wrong_file_is_refused_and_removed(tiny_hub, server, content):
    server.files[CHECKPOINT_PATH] = {"garbage": b"not a weight file" * 100, "wrong kind": _small_dinov2(),
                                     "too large": server.files[DINOV2_PATH]}[content]
    message = "more than the .* its config allows: refused" if content == "too large" else "and was removed"
    with pytest.raises(WeightsError, match=f"the {TINY_NAME} checkpoint.*{message}") as info:
        load_model(TINY_NAME)
    assert "put it at" in str(info.value)
    folder = tiny_hub / "lorat-home" / TINY_NAME
    assert not folder.exists() or not [p for p in folder.iterdir() if p.suffix != ".lock"]  # the lock file stays


def test_http_error_and_offline_give_one_error_line(tiny_hub, server, monkeypatch, capsys):
    from lorat.track import main

    del server.files[DINOV2_PATH]
    args = [str(TINY / "sequence"), "--weights", TINY_NAME, "--init", "76,77,40,38", "--device", "cpu"]
    assert run_cli(main, args) == 2
    stderr = capsys.readouterr().err  # the checkpoint's progress bar, then one error line
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "HTTP 404" in err[0] and "put it at" in err[0] and "Traceback" not in stderr
    # offline, not cached, no mirror: which file, from where, to where
    monkeypatch.setenv("LORAT_OFFLINE", "1")
    monkeypatch.delenv("LORAT_MIRROR")
    assert run_cli(main, args) == 2  # the checkpoint came before the 404: only DINOv2 is missing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not cached and LORAT_OFFLINE is set" in err[0]
    assert f"put it at {tiny_hub / 'torch-home' / 'hub' / 'checkpoints' / TINY_RELEASE}_pretrain.pth" in err[0]
    cached = tiny_hub / "lorat-home" / TINY_NAME / "model.safetensors"
    cached.unlink()
    assert run_cli(main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"Download {TINY_NAME}/model.safetensors from {hub.LORAT_FOLDER}" in err[0]
    assert f"put it at {cached}" in err[0]


def test_refused_connection_names_the_url_and_the_place(tiny_hub, monkeypatch):
    monkeypatch.setenv("LORAT_MIRROR", "http://127.0.0.1:9")  # discard port: nothing listens
    (tiny_hub / "lorat-home" / TINY_NAME).mkdir(parents=True)
    (tiny_hub / "lorat-home" / TINY_NAME / "model.safetensors").write_bytes(
        (TINY / "lorat_trainable.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"cannot download the DINOv2 .* from http://127\.0\.0\.1:9/.*put it at"):
        load_model(TINY_NAME)


def test_names_and_files():
    assert hub.named_model("LoRAT-B-224").config == "b224"
    assert hub.named_model("lorat-g-378").name == "LoRAT-g-378"
    assert hub.named_model("weights/nothing.safetensors") is None
    assert len(hub.MODELS) == 8
    np.testing.assert_equal(sorted(m.config for m in hub.MODELS.values()),
                            sorted(f"{s}{r}" for s in "sblg" for r in (224, 378)))


def test_training_fetches_dinov2_when_no_backbone_is_given(tiny_hub, capsys):
    from lorat.config import load_config
    from lorat.runtime import Distributed
    from lorat.train import _pretrained_backbone

    with Distributed("cpu") as env:
        path = _pretrained_backbone(load_config(TINY / "config.yaml"), env)
        assert _pretrained_backbone(load_config("smoke"), env) is None  # no DINOv2 release: random init
    assert Path(path).read_bytes() == (TINY / "dinov2_backbone.pth").read_bytes()
    assert "DINOv2 dinov2_vitt14" in capsys.readouterr().out

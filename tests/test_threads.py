"""The thread policy: the tuner keeps the thread count whose steps are measured fastest."""

from __future__ import annotations

import pytest
import torch

from lorat.runtime import set_threads
from lorat.tracking.threads import ThreadTuner, thread_candidates


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    set_threads(before)


def _run(tuner: ThreadTuner, step_ms: dict[int, float], steps: int) -> list[int]:
    """Feed the tuner ``steps`` steps whose duration depends on the thread count in use; the counts used."""
    used = []
    for _ in range(steps):
        threads = torch.get_num_threads()
        used.append(threads)
        tuner.record(step_ms[threads] / 1000)
    return used


def test_candidates():
    assert thread_candidates(1) == [1] and thread_candidates(2) == [1, 2] and thread_candidates(16) == [1, 8, 16]


def test_busy_machine_stays_on_one_thread_and_rarely_probes():
    torch.set_num_threads(2)
    tuner = ThreadTuner([1, 2])
    tuner.enable(measure=False)
    used = _run(tuner, {1: 25.0, 2: 80.0}, 600)
    assert used[:80].count(2) <= 3  # the first step, then one probe of 2 threads stopped at its first counted step
    assert used.count(2) <= 6  # and the next probe 512 steps later
    assert tuner.current == 1 and tuner.interval == tuner.last


def test_quiet_machine_keeps_the_faster_count():
    torch.set_num_threads(2)
    tuner = ThreadTuner([1, 2])
    tuner.enable(measure=False)
    used = _run(tuner, {1: 40.0, 2: 25.0}, 300)
    assert used[-50:] == [2] * 50 and tuner.current == 2


def test_a_change_of_load_is_followed_at_once():
    torch.set_num_threads(2)
    tuner = ThreadTuner([1, 2], last=64)
    tuner.enable(measure=False)
    _run(tuner, {1: 40.0, 2: 25.0}, 200)
    assert tuner.current == 2
    used = _run(tuner, {1: 25.0, 2: 90.0}, 20)  # another process starts: the steps turn 3.6x slower
    assert tuner.current == 1 and used[-5:] == [1] * 5
    _run(tuner, {1: 40.0, 2: 25.0}, 200)  # and ends
    assert tuner.current == 2


def test_nearly_equal_counts_do_not_flip():
    torch.set_num_threads(2)
    tuner = ThreadTuner([1, 2])
    tuner.enable(measure=False)
    used = _run(tuner, {1: 25.0, 2: 24.5}, 300)
    # within the 5 % margin: the start (one thread) holds; probes after 16, 32, 64, 128 steps, 4 steps each
    assert tuner.current == 1 and used.count(2) <= 17


def test_a_fixed_thread_count_or_someone_elses_choice_is_left_alone():
    set_threads(1)  # --threads 1
    from lorat.tracking.threads import TUNER

    assert not TUNER.active
    _run(TUNER, {1: 25.0, 2: 1.0}, 50)
    assert torch.get_num_threads() == 1
    tuner = ThreadTuner([1, 2])
    tuner.enable(measure=False)
    torch.set_num_threads(2)
    _run(tuner, {1: 25.0, 2: 80.0}, 10)
    torch.set_num_threads(2)  # the program sets its own count: the tuner stops
    _run(tuner, {1: 25.0, 2: 80.0}, 100)
    assert not tuner.active and torch.get_num_threads() == 2


@pytest.mark.parametrize("idle, start", [(2.0, 2), (1.6, 2), (1.0, 1), (None, 1)])
def test_the_starting_count_follows_how_idle_the_cores_were(monkeypatch, idle, start):
    """All threads where both cores stood idle while the model loaded; one thread beside a busy process
    (or where /proc/stat cannot be read)."""
    import lorat.tracking.threads as threads

    monkeypatch.setattr(threads, "idle_cores", lambda window=0.1: idle)
    torch.set_num_threads(2)
    tuner = ThreadTuner([1, 2])
    tuner.enable()
    assert _run(tuner, {1: 25.0, 2: 25.0}, 5)[1:] == [start] * 4


def test_idle_cores_reads_the_machine():
    from lorat.tracking.threads import idle_cores

    idle = idle_cores(0.05)
    assert idle is None or 0.0 <= idle <= 1024


def test_a_busy_start_looks_again_only_much_later(monkeypatch):
    import lorat.tracking.threads as threads

    monkeypatch.setattr(threads, "idle_cores", lambda window=0.1: 0.9)
    torch.set_num_threads(2)
    tuner = ThreadTuner([1, 2])
    tuner.enable()
    used = _run(tuner, {1: 25.0, 2: 80.0}, 500)
    assert used[1:] == [1] * 499  # a 150-frame clip beside a busy process pays no probe at all


def test_cores_left_idle_does_not_count_this_process():
    """While the model loads this process keeps a core busy itself; only other programs count as busy."""
    import time

    from lorat.tracking.threads import _cpu_sample, _usable_cores, cores_left_idle

    since = _cpu_sample()
    if since is None:
        pytest.skip("no /proc/stat here")
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # busy, like a model load
        pass
    idle = cores_left_idle(since)
    assert idle is not None and 0.0 <= idle <= _usable_cores()
    assert cores_left_idle(_cpu_sample()) is None  # too short a window to tell


def test_threads_option_default_number_and_auto(capsys):
    """Default (or auto): tuned while tracking (the outputs do not depend on the count); a number fixes it."""
    import argparse

    from lorat.errors import LoratError
    from lorat.options import ModelOptions, add_model_arguments
    from lorat.tracking.threads import TUNER

    parser = argparse.ArgumentParser()
    add_model_arguments(parser, ("threads",))
    assert [ModelOptions.from_args(parser.parse_args(a)).threads for a in ([], ["--threads", "1"],
                                                                          ["--threads", "auto"])] == [None, 1, "auto"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "many"])
    assert "expected a number or auto, got 'many'" in capsys.readouterr().err
    set_threads("auto")
    assert TUNER.active
    set_threads(1)
    assert not TUNER.active
    set_threads(None)
    assert TUNER.active
    with pytest.raises(LoratError, match="a number or 'auto'"):
        set_threads("fast")


def _outputs(model, threads: int, batch: int = 2) -> dict[str, torch.Tensor]:
    torch.set_num_threads(threads)
    cfg = model.cfg
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(batch, 3, cfg.template_size[1], cfg.template_size[0], generator=generator)
    x = torch.randn(batch, 3, cfg.search_size[1], cfg.search_size[0], generator=generator)
    mask = torch.randint(0, 2, (batch, *cfg.template_grid), generator=generator)
    with torch.no_grad():
        return model(z, x, mask)


@pytest.mark.parametrize("config", ["demo", "debug"])
def test_outputs_do_not_depend_on_the_thread_count(config):
    """What makes the tuned default safe: 1 and 2 threads give bit-identical outputs (the demo's
    MobileNetV2 stem included: its 1x1 convolutions run as matrix products) -- so no box moves."""
    from lorat.checkpoint.build import build_lorat
    from lorat.config import load_config

    torch.manual_seed(0)
    model = build_lorat(load_config(config).model).eval()
    one, two = _outputs(model, 1), _outputs(model, 2)
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_onnx_runtime_follows_the_thread_count_with_the_same_outputs():
    """The bundled ONNX export runs on torch's current thread count (one session per count), same outputs."""
    pytest.importorskip("onnxruntime")
    from lorat.checkpoint.onnx import OnnxModel
    from lorat.files import bundled_onnx

    model = OnnxModel(bundled_onnx())
    one, two = _outputs(model, 1), _outputs(model, 2)
    assert sorted(model._sessions) == [1, 2]
    for key in one:
        assert torch.equal(one[key], two[key]), key

"""The package as users install it: bundled files, console scripts, a wheel run from another folder,
and environment.yml against pyproject.toml."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from lorat.config import load_config
from lorat.errors import ConfigError
from lorat.files import bundled_config, bundled_weights, config_names

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_project_with_pyproject_dependencies():
    project = _pyproject()["project"]
    declared = {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    pip = next(d["pip"] for d in yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
               if isinstance(d, dict))
    editable = [p for p in pip if p.startswith("-e ")]
    assert editable and editable[0].split()[1].startswith("."), "environment.yml must install the project itself"
    wanted = editable[0].split("[", 1)[1].rstrip("]").split(",") if "[" in editable[0] else []
    assert set(wanted) <= set(extras), f"environment.yml asks for unknown extras {set(wanted) - set(extras)}"
    for line in (p for p in pip if not p.startswith("-")):
        req = Requirement(line)
        assert req.name.lower() in declared, f"{req.name} is in environment.yml but not in pyproject's dependencies"
        pinned = next(iter(req.specifier)).version
        assert declared[req.name.lower()].specifier.contains(pinned), f"{line} does not satisfy pyproject's {req}"


def test_bundled_files_are_found_by_name():
    assert bundled_weights().is_file()
    assert {"b224", "l378", "demo"} <= set(config_names())
    assert bundled_config("b224") == bundled_config("configs/b224.yaml") == bundled_config("b224.yaml")
    assert bundled_config("other/b224.yaml") is None and bundled_config("nope") is None
    assert load_config("l378").model.variant == "L-378"
    with pytest.raises(ConfigError, match="bundled configs: .*b224"):
        load_config("b225")


def test_console_scripts_are_declared_for_every_command():
    scripts = _pyproject()["project"]["scripts"]
    assert {"lorat-track", "lorat-train", "lorat-evaluate", "lorat-app", "lorat-vot"} <= set(scripts)
    import lorat.cli

    for target in scripts.values():
        module, func = target.split(":")
        assert module == "lorat.cli" and callable(getattr(lorat.cli, func))


def test_wheel_tracks_from_another_folder(tmp_path):
    """Build the wheel, install it (without dependencies: those of this environment serve) into a
    folder, and run the quick start from an unrelated folder with the bundled model."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("lorat-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "lorat" / "weights" / "lorat_demo.safetensors").is_file()
    assert (target / "lorat" / "weights" / "lorat_demo.onnx").is_file()  # the default backend's file
    assert (target / "lorat" / "configs" / "b224.yaml").is_file()
    assert (target / "lorat" / "configs" / "trackers.ini").is_file()  # the VOT-toolkit registry example
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("LORAT_WEIGHTS", None)
    where = subprocess.run([sys.executable, "-c", "import lorat, sys; print(lorat.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target))
    out = elsewhere / "box.txt"
    proc = subprocess.run([sys.executable, "-m", "lorat.track", str(ROOT / "assets" / "box.mp4"), "--init",
                           "290,14,308,228", "--max-frames", "5", "--save-txt", str(out)], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bundled demo model" in proc.stdout and str(target) in proc.stdout and "on ONNX Runtime" in proc.stdout
    assert len(out.read_text().splitlines()) == 5
    script = target / "bin" / "lorat-track"
    proc = subprocess.run([str(script), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "--init" in proc.stdout

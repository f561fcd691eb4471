"""What `pip install .` gives a user: one package, `llama_jax`, with its presets, and declared dependencies.

A wheel is built from the tree and installed into a fresh virtual environment that sees this machine's
packages (`--system-site-packages`) but no package index, so pip still checks every declared dependency
is satisfied. It is then used from a directory outside the repository, as a notebook would.
"""

import pathlib
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _run(*cmd, cwd: pathlib.Path) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """Built from a copy of the tracked package, so the build leaves nothing in the working tree."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "llama_jax", src / "llama_jax", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src, cwd=src)
    [built] = out.glob("llama_jax-*.whl")
    return built


def test_the_wheel_installs_only_the_llama_jax_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [record] = [n for n in names if n.endswith(".dist-info/RECORD")]
        recorded = {line.split(",")[0] for line in zf.read(record).decode().splitlines() if line}
        top_level = {n for n in names if n.endswith(".dist-info/top_level.txt")}
        if top_level:
            assert zf.read(top_level.pop()).decode().split() == ["llama_jax"]
    assert recorded == set(names)
    assert {n.split("/")[0] for n in names} == {"llama_jax", record.split("/")[0]}
    assert {"llama_jax/configs/llama3_1_405b.py", "llama_jax/configs/finetune_lora.py"} <= set(names)
    assert {"llama_jax/sharding/rules.py", "llama_jax/weights/meta.py", "llama_jax/model/model.py"} <= set(names)
    # package data moves with the layer that reads it: XLA's GPU target configs, beside targets.py
    assert {"llama_jax/planning/gpu_specs/h100_sxm.txtpb", "llama_jax/planning/gpu_specs/h200.txtpb"} <= set(names)


def test_the_installed_package_imports_and_resolves_presets_by_name(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--no-index", wheel, cwd=tmp_path)
    code = textwrap.dedent("""
        import importlib.util, sys
        import llama_jax
        from llama_jax.model.config import config_path, model_config_from_file
        print(llama_jax.__file__)
        print(config_path("finetune_lora"))
        print(model_config_from_file("llama3_1_8b").num_params())
        print(importlib.util.find_spec("configs"), importlib.util.find_spec("sharding"))
        print(sorted(m for m in sys.modules if m.split(".")[0] == "jax"))
    """)
    package, preset, params, collisions, jax_modules = _run(python, "-c", code, cwd=tmp_path).splitlines()
    site = str(venv / "lib")
    assert package.startswith(site) and preset.startswith(site) and preset.endswith("configs/finetune_lora.py")
    assert params == "8030261248"
    assert collisions == "None None"
    assert jax_modules == "[]"  # resolving a config imports no JAX
    assert "generate" in _run(venv / "bin" / "llama-jax", "--help", cwd=tmp_path)  # the console script


def test_the_tested_pins_lie_in_the_declared_ranges():
    """requirements.txt is the exact tested set; pyproject's ranges must admit it, package by package."""
    declared = {Requirement(r).name: Requirement(r) for r in PROJECT["dependencies"]}
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pinned[Requirement(line).name] = Requirement(line)
    assert set(declared) == set(pinned)
    for name, req in pinned.items():
        exact = [s.version for s in req.specifier if s.operator == "=="]
        for version in exact:
            assert declared[name].specifier.contains(version), f"{name}=={version} outside {declared[name]}"

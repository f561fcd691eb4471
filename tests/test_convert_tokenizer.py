"""`convert` carries the source's tokenizer, so `--checkpoint DST` runs on every converted directory."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from llama_jax import cli
from llama_jax.jobs.convert import HF_TOKENIZER_FILES, convert
from llama_jax.text.tokenizer import Tokenizer, find_tokenizer
from tests.checkpoints import hf_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hf_download(path, tokenizer_model, *, vocab_size=384):
    """An HF repository as Meta publishes Llama 3.1 on the Hub: tokenizer.model only under `original/`,
    HF's own tokenizer and generation files at the root."""
    hf_checkpoint(path, vocab_size=vocab_size, n_layers=1, dtype=torch.bfloat16)
    (path / "original").mkdir()
    shutil.copy(tokenizer_model, path / "original" / "tokenizer.model")
    for name in HF_TOKENIZER_FILES:
        (path / name).write_text(json.dumps({"file": name}))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, llama3_tokenizer_path):
    """One source per layout, each holding the tokenizer where that layout keeps it."""
    root = tmp_path_factory.mktemp("sources")
    hf = hf_download(root / "hf", llama3_tokenizer_path)
    meta = convert(hf, root / "meta", to="meta", progress=False)
    orbax = convert(hf, root / "orbax", to="orbax", progress=False)
    for converted in (meta, orbax):  # independent of what convert carries: the layouts' own places
        shutil.copy(llama3_tokenizer_path, converted / "tokenizer.model")
    return {"hf": hf, "meta": meta, "orbax": orbax}


@pytest.mark.parametrize(
    ("src", "to"), [("hf", "hf"), ("hf", "orbax"), ("hf", "meta"), ("meta", "hf"), ("orbax", "hf")]
)
def test_convert_carries_the_tokenizer_to_where_the_output_layout_keeps_it(
    src, to, sources, tmp_path, llama3_tokenizer_path
):
    out = convert(sources[src], tmp_path / "out", to=to, progress=False)
    assert find_tokenizer(out) == out / "tokenizer.model"
    assert (out / "tokenizer.model").read_bytes() == llama3_tokenizer_path.read_bytes()
    assert Tokenizer.from_file(find_tokenizer(out)).encode("Hello", bos=True, eos=False)[0] == 128000
    # HF's own files, as they are, wherever the source has them and the output layout has a place for them.
    carried = {name for name in HF_TOKENIZER_FILES if (out / name).is_file()}
    assert carried == (set(HF_TOKENIZER_FILES) if src != "meta" and to != "meta" else set())
    for name in carried:
        assert (out / name).read_text() == json.dumps({"file": name})


def test_a_source_without_a_tokenizer_converts_with_a_warning_naming_where_it_looked(sources, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(sources["hf"], bare, ignore=shutil.ignore_patterns("original"))
    with pytest.warns(UserWarning, match=re.escape(f"looked for {bare}/tokenizer.model and {bare}/original/")):
        out = convert(bare, tmp_path / "out", progress=False)
    assert find_tokenizer(out) is None

    code = cli.main(["convert", str(bare), str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "convert: warning:" in err and "--tokenizer PATH" in err


def test_generate_runs_on_every_layout_a_conversion_chain_writes(tmp_path, llama3_tokenizer_path, capsys):
    """HF download → Meta → Orbax → HF, each step from the previous one's output; then `generate --checkpoint`."""
    src = hf_download(tmp_path / "hf", llama3_tokenizer_path, vocab_size=128_256)
    meta = convert(src, tmp_path / "meta", to="meta", progress=False)
    orbax = convert(meta, tmp_path / "orbax", to="orbax", progress=False)
    back = convert(orbax, tmp_path / "back", to="hf", progress=False)
    for out in (meta, orbax):
        assert find_tokenizer(out).read_bytes() == llama3_tokenizer_path.read_bytes()
    argv = ["generate", "--checkpoint", str(back), "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0"]
    code, err = cli.main(argv), capsys.readouterr().err
    assert code == 0 and "tokens, stop:" in err, err


def test_python_m_llama_jax_convert_runs_the_command_without_a_runtime_warning():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "llama_jax.jobs.convert", "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m llama_jax.jobs.convert [-h]")
    assert not re.search(r"\w+Warning:", proc.stderr), proc.stderr

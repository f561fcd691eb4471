"""A batch job resumes only under the settings its results were made with (`<output>.job.json`): a
changed setting is refused by name before anything is written, settings that cannot change a result
(paths, the batch size) resume to the bytes of an uninterrupted run, and --force-resume overrides."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from llama_jax.jobs import jobs
from llama_jax.jobs.batch_files import check_settings
from llama_jax.model.config import model_config_from_file
from tests import checkpoints

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()
KILLED_AFTER = 5  # results in the output when the job "died"


@pytest.fixture(scope="module")
def made(tmp_path_factory, llama3_tokenizer_path):
    """A checkpoint, 12 requests, and the output (with its settings record) of one uninterrupted run."""
    root = tmp_path_factory.mktemp("settings")
    checkpoints.hf_checkpoint(root / "ckpt", vocab_size=128_256, dim=64, n_layers=2)
    shutil.copy(llama3_tokenizer_path, root / "ckpt" / "tokenizer.model")
    rng = np.random.default_rng(0)
    requests = [{"id": i, "prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 20))))} for i in range(12)]
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    done = batch_command(root, root / "whole.jsonl")
    assert done.returncode == 0, done.stderr
    return root


def batch_command(root, output, *extra: str) -> subprocess.CompletedProcess:
    """`python -m llama_jax batch` as a user runs it; `extra` options override the ones before them."""
    command = [sys.executable, "-m", "llama_jax", "batch", "--checkpoint", str(root / "ckpt"), "--dtype", "float32"]
    command += ["--input", str(root / "in.jsonl"), "--output", str(output), "--max-new-tokens", "4"]
    command += ["--temperature", "0.7", "--batch-size", "4", "--no-progress", *extra]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def killed_run(made, tmp_path) -> pathlib.Path:
    """The uninterrupted run's output cut after its first results, with its settings record: a job that died."""
    output = tmp_path / "out.jsonl"
    output.write_bytes(b"".join((made / "whole.jsonl").read_bytes().splitlines(keepends=True)[:KILLED_AFTER]))
    shutil.copy(made / "whole.jsonl.job.json", tmp_path / "out.jsonl.job.json")
    return output


def test_a_resume_with_other_settings_is_refused_naming_each_field(made, tmp_path):
    output = killed_run(made, tmp_path)
    before = output.read_bytes(), (tmp_path / "out.jsonl.job.json").read_bytes()
    done = batch_command(made, output, "--max-new-tokens", "6", "--seed", "1")
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"batch: error: {output} holds results made with other settings")
    assert "max_new_tokens: 4 -> 6; seed: 0 -> 1." in error and "--force-resume" in error
    assert "temperature" not in error  # only what differs is named
    assert (output.read_bytes(), (tmp_path / "out.jsonl.job.json").read_bytes()) == before


def test_settings_that_cannot_change_a_result_resume_to_the_same_bytes(made, tmp_path):
    output = killed_run(made, tmp_path)
    done = batch_command(made, output, "--batch-size", "2", "--errors", str(tmp_path / "other.errors.jsonl"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["skipped"] == KILLED_AFTER
    assert output.read_bytes() == (made / "whole.jsonl").read_bytes()


def test_force_resume_resumes_under_the_new_settings_and_records_them(made, tmp_path):
    output = killed_run(made, tmp_path)
    done = batch_command(made, output, "--max-new-tokens", "6", "--force-resume")
    assert done.returncode == 0, done.stderr
    lines = output.read_bytes().splitlines(keepends=True)
    whole = (made / "whole.jsonl").read_bytes().splitlines(keepends=True)
    assert lines[:KILLED_AFTER] == whole[:KILLED_AFTER]  # kept, as asked
    assert max(json.loads(line)["completion_tokens"] for line in lines[KILLED_AFTER:]) == 6  # the new setting
    assert json.loads((tmp_path / "out.jsonl.job.json").read_text())["max_new_tokens"] == 6
    again = batch_command(made, output, "--max-new-tokens", "6")  # the record now holds the new settings
    assert again.returncode == 0, again.stderr


def test_weights_rewritten_under_the_same_path_are_told_apart(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "config.json").write_text("{}")
    model = types.SimpleNamespace(
        config=model_config_from_file("tiny"),
        dtype="float32",
        options=types.SimpleNamespace(attention_backend="auto"),
        fp8=None,
        lora=None,
    )
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": 0}\n')

    def resume(force=False):
        check_settings(output, {"model": jobs.model_identity(model, ckpt), "seed": 0}, force=force)

    resume()  # a first run (no record yet) records the settings
    resume()  # the same checkpoint resumes
    stamp = os.stat(ckpt / "model.safetensors").st_mtime_ns
    os.utime(ckpt / "model.safetensors", ns=(stamp, stamp + 10**9))  # rewritten, same size
    with pytest.raises(ValueError, match=r'model\.checkpoint\.files\["model\.safetensors"\]: \[7, \d+\] -> \[7, \d+\]'):
        resume()
    resume(force=True)
    (ckpt / "model-2.safetensors").write_bytes(b"more")
    with pytest.raises(ValueError, match=r'files\["model-2\.safetensors"\]: \(absent\) -> \[4, \d+\]'):
        resume()

"""The batch job on two processes (jax.distributed on 127.0.0.1, 4 CPU devices each, one data=8 mesh
over both): the same output file, byte for byte, as one process; process 0 alone writes it."""

import json
import pathlib
import shutil
import sys

import numpy as np

import llama_jax
from llama_jax import batch
from llama_jax.tokenizer import Tokenizer
from tests import checkpoints, processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()
TIMEOUT_S = 300


def test_two_processes_write_the_file_one_process_writes(tmp_path, llama3_tokenizer_path):
    ckpt = tmp_path / "ckpt"
    checkpoints.hf_checkpoint(ckpt, vocab_size=128_256, dim=64, n_layers=2)
    shutil.copy(llama3_tokenizer_path, ckpt / "tokenizer.model")
    rng = np.random.default_rng(0)
    requests = [{"id": i, "prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))} for i in range(20)]
    for i in range(0, 20, 3):
        requests[i] |= {"temperature": 0.8, "n": 2}
    requests.append({"id": "bad", "prompt": 3})
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    settings = dict(max_new_tokens=6, temperature=0.0, batch_size=8, progress=False)
    single = llama_jax.load(ckpt, dtype="float32")
    summary = batch.run_batch(
        single, Tokenizer.from_file(llama3_tokenizer_path), tmp_path / "in.jsonl", tmp_path / "one.jsonl", **settings
    )
    assert summary["completed"] == 27 and summary["errors"] == 1

    env = processes.clean_env(ROOT) | {
        "JAX_NUM_CPU_DEVICES": "4",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{processes.free_port()}",
        "JAX_NUM_PROCESSES": "2",
    }
    command = [
        sys.executable,
        "-m",
        "llama_jax",
        "batch",
        "--checkpoint",
        str(ckpt),
        "--dtype",
        "float32",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--output",
        str(tmp_path / "two.jsonl"),
        "--mesh",
        "data=8",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    logs = processes.run_all(
        [command] * 2, [env | {"JAX_PROCESS_ID": str(i)} for i in range(2)], cwd=ROOT, timeout=TIMEOUT_S
    )
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    errors = [json.loads(line) for line in (tmp_path / "two.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["bad"]
    for log in logs:  # both processes ran every request (the same schedule), in one 2-process job
        assert json.loads(log.strip().splitlines()[-1])["completed"] == 27

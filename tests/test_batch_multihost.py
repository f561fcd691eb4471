"""The batch job on two processes (jax.distributed on 127.0.0.1, 4 CPU devices each, one data=8 mesh
over both): the same output file, byte for byte, as one process; process 0 alone writes it. When a
process dies, the other stops within the peer timeout naming it, and a restart of both finishes the file."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

import llama_jax
from llama_jax.jobs import batch
from llama_jax.sharding import distributed
from llama_jax.text.tokenizer import Tokenizer
from tests import checkpoints, processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()
TIMEOUT_S = 300
PEER_TIMEOUT_S = 5


def write_job(tmp_path, tokenizer_path, requests: list[dict]) -> pathlib.Path:
    """A small checkpoint (with its tokenizer) and the input file; → the checkpoint directory."""
    ckpt = tmp_path / "ckpt"
    checkpoints.hf_checkpoint(ckpt, vocab_size=128_256, dim=64, n_layers=2)
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    return ckpt


def prompts(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"id": i, "prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))} for i in range(n)]


def one_process(tmp_path, ckpt, tokenizer_path, max_new_tokens: int) -> bytes:
    """The output of the job in this process, on one device: what the two processes must write."""
    model, tokenizer = llama_jax.load(ckpt, dtype="float32"), Tokenizer.from_file(tokenizer_path)
    settings = dict(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=8, progress=False)
    batch.run_batch(model, tokenizer, tmp_path / "in.jsonl", tmp_path / "one.jsonl", **settings)
    return (tmp_path / "one.jsonl").read_bytes()


def two_processes(tmp_path, ckpt, max_new_tokens: int, *extra: str) -> tuple[list[list[str]], list[dict]]:
    """(commands, environments) of `python -m llama_jax batch` as processes 0 and 1 of one job."""
    env = processes.clean_env(ROOT) | {
        "JAX_NUM_CPU_DEVICES": "4",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{processes.free_port()}",
        "JAX_NUM_PROCESSES": "2",
    }
    command = [sys.executable, "-m", "llama_jax", "batch", "--checkpoint", str(ckpt), "--dtype", "float32"]
    command += ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "two.jsonl"), "--mesh", "data=8"]
    command += ["--max-new-tokens", str(max_new_tokens), "--temperature", "0", "--batch-size", "8", "--no-progress"]
    return [command + list(extra)] * 2, [env | {"JAX_PROCESS_ID": str(i)} for i in range(2)]


def test_two_processes_write_the_file_one_process_writes(tmp_path, llama3_tokenizer_path):
    requests = prompts(20)
    for i in range(0, 20, 3):
        requests[i] |= {"temperature": 0.8, "n": 2}
    requests.append({"id": "bad", "prompt": 3})
    ckpt = write_job(tmp_path, llama3_tokenizer_path, requests)
    single = one_process(tmp_path, ckpt, llama3_tokenizer_path, max_new_tokens=6)

    logs = processes.run_all(*two_processes(tmp_path, ckpt, 6), cwd=ROOT, timeout=TIMEOUT_S)
    assert (tmp_path / "two.jsonl").read_bytes() == single
    errors = [json.loads(line) for line in (tmp_path / "two.jsonl.errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["bad"]
    for log in logs:  # both processes ran every request (the same schedule), in one 2-process job
        assert json.loads(log.strip().splitlines()[-1])["completed"] == 27


def test_when_process_1_dies_process_0_stops_naming_it_and_a_restart_finishes(tmp_path, llama3_tokenizer_path):
    ckpt = write_job(tmp_path, llama3_tokenizer_path, prompts(64))
    single = one_process(tmp_path, ckpt, llama3_tokenizer_path, max_new_tokens=12)
    commands, envs = two_processes(tmp_path, ckpt, 12, "--peer-timeout", str(PEER_TIMEOUT_S))
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [
        subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=e)
        for c, e, log in zip(commands, envs, logs, strict=True)
    ]
    try:
        output, deadline = tmp_path / "two.jsonl", time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and procs[0].poll() is None:
            if output.exists() and output.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.05)
        assert procs[0].poll() is None and procs[1].poll() is None  # the kill lands mid-job
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=TIMEOUT_S)
        stopped_after = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs[0].seek(0)
    log = logs[0].read()
    assert procs[0].returncode == distributed.PEER_LOST_EXIT, log[-4000:]
    assert "error: process 0 lost process 1 of this 2-process job" in log
    assert stopped_after < PEER_TIMEOUT_S + 15  # the timeout, a beat interval, and a busy machine's slack
    written = output.read_bytes().count(b"\n")
    assert 8 <= written < 64

    restarted = processes.run_all(*two_processes(tmp_path, ckpt, 12), cwd=ROOT, timeout=TIMEOUT_S)
    assert json.loads(restarted[0].strip().splitlines()[-1])["skipped"] >= 8
    assert output.read_bytes() == single

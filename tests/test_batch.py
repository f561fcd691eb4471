"""The batch job, end to end on a small transformers checkpoint with the real Llama 3 tokenizer: a few
hundred mixed requests give what `generate` gives one request at a time, whatever their batch; a run
killed with SIGKILL and started again writes the same bytes as one that never stopped; bad lines go to
the errors file with their line numbers; top_logprobs are the model's own, in the format the
fine-tuning reader takes."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.inference import sampler
from llama_jax.jobs import batch
from llama_jax.sharding.mesh import make_mesh
from llama_jax.text.chat import ChatFormat
from llama_jax.text.tokenizer import Tokenizer
from tests import checkpoints
from tests.processes import sigkill_once_written

REPO = pathlib.Path(__file__).resolve().parent.parent
CONTEXT = 40  # the checkpoint's max_position_embeddings: small, so "too long" is easy to reach
NEW_TOKENS = 5  # the job default in these tests; some requests ask for their own
TOP_P = 0.9  # llama_jax/configs/batch.py's, for the sampled requests
BATCH = 16
N_GOOD = 240
WORDS = "the of and to in is was for on that with as by at from his her an were are which this be".split()

# Bad lines, planted after line 100: (line content, field named, words of the reason).
BAD_LINES = [
    ("{not json", None, "not valid JSON"),
    ('{"prompt": "no id"}', "id", "missing id"),
    ('{"id": "r7", "prompt": "seen before"}', "id", 'duplicate id "r7" (first on line 8)'),
    ('{"id": "neither"}', "prompt", "exactly one of 'prompt'"),
    ('{"id": "both", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "prompt", "exactly one of"),
    (json.dumps({"id": "long", "prompt": " ".join(["word"] * 120)}), "prompt", "prompt too long"),
    ('{"id": "hot", "prompt": "a", "temperature": -1}', "temperature", "expected a number >= 0"),
    ('{"id": "p", "prompt": "a", "top_p": 0}', "top_p", "expected a number in (0, 1]"),
    ('{"id": "typo", "prompt": "a", "max_tokens": 3}', "max_tokens", "unknown field"),
    ('{"id": 1.5, "prompt": "a"}', "id", "expected a string or an integer"),
    ('{"id": "role", "messages": [{"role": "robot", "content": "x"}]}', "messages", "role"),
]
BAD_AT = 100


def make_requests(seed=0) -> list[dict]:
    """Prompts of 1 to 32 tokens (two prompt buckets), a third of them chats, some with their own
    max_new_tokens, some sampled (with and without their own seed), some asking for top_logprobs."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(N_GOOD):
        chat = i % 3 == 0
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(0, 12 if chat else 30))))
        request = {"id": f"r{i}" if i % 5 else i}
        if chat:
            request["messages"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        else:
            request["prompt"] = text
        if i % 7 == 0:
            request["max_new_tokens"] = 3
        if i % 4 == 1:
            request["temperature"] = 0.8
            if i % 8 == 1:
                request["seed"] = int(rng.integers(0, 2**32))
        if i % 11 == 2 and "temperature" not in request:
            request["top_logprobs"] = 4
        requests.append(request)
    return requests


@pytest.fixture(scope="module")
def job(tmp_path_factory, llama3_tokenizer_path):
    """A checkpoint dir (with tokenizer.model), its model and tokenizer, the input file, and the output
    of one uninterrupted run of the command."""
    root = tmp_path_factory.mktemp("batch")
    ckpt = root / "ckpt"
    reference = checkpoints.hf_checkpoint(ckpt, vocab_size=128_256, dim=64, n_layers=2)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    shutil.copy(llama3_tokenizer_path, ckpt / "tokenizer.model")
    # The commands and this process share one persistent compilation cache (the session's if the
    # environment names one), so the same programs compile once. JAX decides whether to use the cache
    # at a process's first compilation: if something compiled here before, only the commands share it.
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or saved["jax_compilation_cache_dir"] or str(root / "jax")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    model = llama_jax.load(ckpt, dtype="float32")
    tokenizer = Tokenizer.from_file(llama3_tokenizer_path)
    requests = make_requests()
    lines = [json.dumps(r) for r in requests]
    lines[BAD_AT:BAD_AT] = [bad for bad, _, _ in BAD_LINES]
    (root / "in.jsonl").write_text("\n".join(lines) + "\n\n")  # a blank line at the end is not an error
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_COMPILATION_CACHE_DIR"] = cache
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    job = dict(root=root, ckpt=ckpt, model=model, reference=reference, tokenizer=tokenizer, requests=requests, env=env)
    job["output"] = root / "out.jsonl"
    proc = subprocess.run(command(job, job["output"]), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job["summary"] = json.loads(proc.stdout)
    yield job
    for key, value in saved.items():
        jax.config.update(key, value)


def command(job, output) -> list[str]:
    """The job as a user runs it: the config file, the checkpoint, overrides on the command line."""
    return [
        sys.executable,
        "-m",
        "llama_jax",
        "batch",
        "--config",
        "batch",
        "--checkpoint",
        str(job["ckpt"]),
        "--dtype",
        "float32",
        "--input",
        str(job["root"] / "in.jsonl"),
        "--output",
        str(output),
        f"--config.max_new_tokens={NEW_TOKENS}",
        "--config.temperature=0",
        "--batch-size",
        str(BATCH),
        "--no-progress",
    ]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def prompt_ids(request, tokenizer) -> list[int]:
    if "prompt" in request:
        return tokenizer.encode(request["prompt"], bos=True, eos=False)
    return ChatFormat(tokenizer).encode_dialog(request["messages"])


def test_each_result_is_what_generate_gives_that_request_alone(job):
    model, tokenizer = job["model"], job["tokenizer"]
    results = read_jsonl(job["output"])
    assert [r["id"] for r in results] == [q["id"] for q in job["requests"]]  # input order, bad lines left out
    sampled = 0
    for request, result in zip(job["requests"], results, strict=True):
        prompt = prompt_ids(request, tokenizer)
        temperature = request.get("temperature", 0.0)
        seed = request.get("seed", batch.request_seed(0, request["id"]))
        sampled += temperature > 0
        [alone] = sampler.generate(
            model,
            [prompt],
            max_new_tokens=request.get("max_new_tokens", NEW_TOKENS),
            temperature=temperature,
            top_p=TOP_P,
            seed=seed,
            stop_tokens=tokenizer.stop_tokens,
        )
        assert result["tokens"] == list(alone.tokens), request["id"]
        assert result["stop_reason"] == alone.stop_reason
        assert result["text"] == tokenizer.decode(list(alone.tokens))
        assert (result["prompt_tokens"], result["completion_tokens"]) == (len(prompt), len(alone.tokens))
        if "messages" in request:
            assert result["message"] == ChatFormat(tokenizer).decode_result(alone)
        else:
            assert "message" not in result
    assert sampled >= 50
    assert len({tuple(r["tokens"]) for r in results}) > N_GOOD // 2  # not one degenerate answer


def test_the_summary_counts_requests_tokens_and_bad_lines(job):
    summary, results = job["summary"], read_jsonl(job["output"])
    assert summary["completed"] == N_GOOD and summary["skipped"] == summary["failed"] == 0
    assert summary["errors"] == len(BAD_LINES) and summary["requests"] == N_GOOD + len(BAD_LINES)
    assert summary["generated_tokens"] == sum(r["completion_tokens"] for r in results)
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in results)
    assert summary["generated_tokens_per_s"] > 0
    # One decode program per sampling mode (greedy, sampled, greedy with top_logprobs), and one prefill
    # per mode and chunk length (the longest remaining prompt part as a power of two >= 16: 16 or 32 here;
    # prefill samples the first token), whatever the batch.
    compiles = summary["compiles"]
    assert compiles["decode"] == 3 and 3 <= compiles["prefill"] <= 3 * 2


def test_bad_lines_are_reported_with_line_number_field_and_reason(job):
    errors = read_jsonl(job["output"].with_name("out.jsonl.errors.jsonl"))
    assert [e["line"] for e in errors] == list(range(BAD_AT + 1, BAD_AT + 1 + len(BAD_LINES)))
    for error, (_, field, reason) in zip(errors, BAD_LINES, strict=True):
        assert error["field"] == field and reason in error["error"], error
        assert error["file"].endswith("in.jsonl")
    assert errors[2]["id"] == "r7" and errors[0]["id"] is None


def test_top_logprobs_are_the_models_k_most_likely_tokens_at_each_position(job):
    asked = [(q, r) for q, r in zip(job["requests"], read_jsonl(job["output"]), strict=True) if "top_logprobs" in q]
    assert len(asked) >= 10
    for request, result in asked:
        # The distribution of token t is the model's output at position t - 1, here from transformers'
        # forward pass over the whole sequence (no cache, another implementation of the same weights).
        with torch.no_grad():
            logits = job["reference"](torch.tensor([result["sequence"]])).logits[0].double().numpy()
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        start = result["completion_start"]
        sequence = result["sequence"]
        assert start == result["prompt_tokens"]
        assert sequence[start:] == result["tokens"] + ([] if result["stop_reason"] == "length" else [sequence[-1]])
        ids, logprobs = result["top_logprobs"]["ids"], result["top_logprobs"]["logprobs"]
        assert len(ids) == len(logprobs) == len(sequence) - start
        for t in range(start, len(sequence)):
            row_ids, row_logprobs = ids[t - start], logprobs[t - start]
            assert len(row_ids) == request["top_logprobs"]
            np.testing.assert_allclose(row_logprobs, np.sort(logp[t - 1])[::-1][: len(row_ids)], atol=1e-4)
            np.testing.assert_allclose(logp[t - 1][row_ids], row_logprobs, atol=1e-4)
    others = [r for q, r in zip(job["requests"], read_jsonl(job["output"]), strict=True) if "top_logprobs" not in q]
    assert not any("sequence" in r or "top_logprobs" in r for r in others)


def test_the_fine_tuning_reader_takes_the_distillation_lines_as_they_are(job, tmp_path):
    from llama_jax.jobs import data

    lines = [line for line in job["output"].read_text().splitlines(keepends=True) if '"top_logprobs"' in line]
    (tmp_path / "distill.jsonl").write_text("".join(lines))
    examples = data.load_examples(tmp_path / "distill.jsonl", tokenizer=None, seq_len=CONTEXT)
    records = [json.loads(line) for line in lines]
    mask = examples.loss_mask > 0
    assert mask.sum() == sum(len(r["sequence"]) - r["completion_start"] for r in records)
    expected = sorted(ids for r in records for ids in r["top_logprobs"]["ids"])
    assert sorted(examples.teacher_ids[mask].tolist()) == expected


def test_a_torn_last_line_is_cut_and_its_request_rerun(job, tmp_path):
    data = job["output"].read_bytes()
    lines = data.splitlines(keepends=True)
    torn = b"".join(lines[:150]) + lines[150][: len(lines[150]) // 2]  # killed in the middle of line 151
    output = tmp_path / "out.jsonl"
    output.write_bytes(torn)
    # The rest of the job, in other batches than the first run's, in this process: the same bytes.
    rerun = functools.partial(
        batch.run_batch,
        job["model"],
        job["tokenizer"],
        job["root"] / "in.jsonl",
        output,
        batch_size=BATCH,
        progress=False,
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
    )
    summary = rerun()
    assert summary["torn_line_repaired"] and summary["skipped"] == 150
    assert summary["completed"] == N_GOOD - 150
    assert output.read_bytes() == data
    summary = rerun()  # a finished job has nothing left to do
    assert summary["completed"] == 0 and summary["skipped"] == N_GOOD and not summary["torn_line_repaired"]
    assert output.read_bytes() == data


def test_killed_with_sigkill_and_restarted_the_file_is_byte_identical(job, tmp_path):
    output, env = tmp_path / "out.jsonl", job["env"]
    written = sigkill_once_written(command(job, output), output, 2 * BATCH, cwd=REPO, env=env, timeout=120)
    assert 2 * BATCH <= written < N_GOOD
    output.write_bytes(output.read_bytes() + b'{"id": "r9", "text": "half a li')  # as if killed mid-write

    done = subprocess.run(command(job, output), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped"] == written and summary["completed"] == N_GOOD - written
    assert summary["torn_line_repaired"]
    assert output.read_bytes() == job["output"].read_bytes()
    assert (
        output.with_name("out.jsonl.errors.jsonl").read_bytes()
        == job["output"].with_name("out.jsonl.errors.jsonl").read_bytes()
    )


def test_on_a_data_parallel_mesh_the_results_are_the_same(job, tmp_path):
    mesh = make_mesh("data=8")
    model = llama_jax.load(job["ckpt"], dtype="float32", mesh=mesh)
    # Greedy plain-text requests of the first prompt bucket: one program, split over 8 devices.
    wanted = [i for i, q in enumerate(job["requests"]) if set(q) == {"id", "prompt"} and len(q["prompt"].split()) < 12]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(job["requests"][i]) + "\n" for i in wanted))
    summary = batch.run_batch(
        model,
        job["tokenizer"],
        tmp_path / "in.jsonl",
        tmp_path / "out.jsonl",
        batch_size=4,
        progress=False,
        max_new_tokens=NEW_TOKENS,
        temperature=0.0,
    )
    assert summary["completed"] == len(wanted) >= 20
    # 4 slots were raised to the 8 data-parallel devices: still one decode program, one prefill per chunk length
    assert summary["compiles"]["decode"] == 1 and summary["compiles"]["prefill"] <= 2
    expected = job["output"].read_bytes().splitlines(keepends=True)
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(expected[i] for i in wanted)
    assert len(jax.devices()) == 8


def test_config_file_and_overrides_set_the_job(tmp_path):
    from llama_jax import cli

    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "batch",
            "--config",
            "batch",
            "--input",
            "in.jsonl",
            "--config.output=out.jsonl",
            "--config.max_new_tokens=64",
            "--mesh",
            "data=8",
            "--config.top_logprobs",
            "5",
            "--no-progress",
        ]
    )
    job = batch.job_config(args)
    assert (job.input, job.output, job.max_new_tokens, job.mesh, job.top_logprobs) == (
        "in.jsonl",
        "out.jsonl",
        64,
        "data=8",
        5,
    )
    assert job.progress is False and job.temperature == batch.JobConfig().temperature
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'max_len': 3})\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['max_len'\]"):
        batch.job_config(parser.parse_args(["batch", "--config", str(bad), "--input", "a", "--output", "b"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["batch", "--config.max_new_tokens=many"])


def test_n_samples_of_a_request_are_the_rejection_samplers_requests_and_resume_whole(job, tmp_path):
    model, tokenizer = job["model"], job["tokenizer"]
    requests = [
        {"id": "a", "prompt": "the of and to in is was", "n": 3},
        {"id": 7, "prompt": "at from his", "n": 2, "seed": 11},
        {"id": "one", "prompt": "which this be"},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    output = tmp_path / "out.jsonl"
    run = functools.partial(
        batch.run_batch,
        model,
        tokenizer,
        tmp_path / "in.jsonl",
        output,
        batch_size=4,
        progress=False,
        max_new_tokens=NEW_TOKENS,
        temperature=0.8,
    )
    summary = run()
    results = read_jsonl(output)
    assert [r["id"] for r in results] == ["a#0", "a#1", "a#2", "7#0", "7#1", "one"] and summary["completed"] == 6
    for result in results:  # sample k of request r: seed request_seed(r's seed or the job's, "<id>#<k>")
        request = next(q for q in requests if result["id"].split("#")[0] == str(q["id"]))
        seed = (
            batch.request_seed(request.get("seed", 0), result["id"]) if "n" in request else batch.request_seed(0, "one")
        )
        [alone] = sampler.generate(
            model,
            [prompt_ids(request, tokenizer)],
            max_new_tokens=NEW_TOKENS,
            temperature=0.8,
            top_p=TOP_P,
            seed=seed,
            stop_tokens=tokenizer.stop_tokens,
        )
        assert result["tokens"] == list(alone.tokens), result["id"]
    data = output.read_bytes()
    output.write_bytes(b"".join(data.splitlines(keepends=True)[:2]))  # killed after two samples of "a"
    summary = run()
    assert (summary["skipped"], summary["completed"]) == (0, 4) and output.read_bytes() == data


def test_a_result_id_of_n_samples_cannot_be_taken_by_another_request(job, tmp_path):
    model, tokenizer = job["model"], job["tokenizer"]
    requests = [
        {"id": "a", "prompt": "the of", "n": 2},  # results "a#0", "a#1"
        {"id": "a#1", "prompt": "and to"},  # taken: an error line
        {"id": "b#0", "prompt": "in is"},
        {"id": "b", "prompt": "was at", "n": 2},  # would write a second "b#0": an error line
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    output = tmp_path / "out.jsonl"
    batch.run_batch(model, tokenizer, tmp_path / "in.jsonl", output, batch_size=4, progress=False, max_new_tokens=2)
    assert [r["id"] for r in read_jsonl(output)] == ["a#0", "a#1", "b#0"]
    errors = read_jsonl(output.with_name("out.jsonl.errors.jsonl"))
    assert [(e["line"], e["field"]) for e in errors] == [(2, "id"), (4, "id")]
    assert "line 1" in errors[0]["error"] and "line 3" in errors[1]["error"]

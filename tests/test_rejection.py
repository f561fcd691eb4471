"""Rejection sampling: the scorer's favourite samples are the ones kept; a SIGKILLed run resumes to the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llama_jax
from llama_jax.jobs import data, dpo, rejection
from llama_jax.weights.default_model import default_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# top-k 2 at temperature 1: each step draws one of the two likeliest tokens, so the n samples of a prompt
# differ and the greedy continuation's first token appears in about half of them.
SAMPLING = dict(max_new_tokens=4, temperature=1.0, top_k=2, top_p=1.0, seed=3)


def prefers_the_known_token(request, sample) -> float:
    """The scorer under test: 1 when the sample contains the request's `prefer` token id."""
    return float(request["prefer"] in sample["tokens"])


@pytest.fixture(scope="module")
def policy():
    return default_model(warn=False)


def write_prompts(path, model, tokenizer, n=6):
    prompts = [f"Story {i}: once upon a time" for i in range(n)]
    greedy = llama_jax.generate(
        model, [tokenizer.encode(p, bos=True, eos=False) for p in prompts], max_new_tokens=1, stop_tokens=[]
    )
    records = [
        {"id": i, "prompt": p, "prefer": out.tokens[0]} for i, (p, out) in enumerate(zip(prompts, greedy, strict=True))
    ]
    records.append({"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "prefer": -1})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_the_selected_samples_contain_the_token_the_scorer_prefers(policy, tokenizer, tmp_path):
    records = write_prompts(tmp_path / "prompts.jsonl", policy, tokenizer)
    summary = rejection.run(
        policy,
        tokenizer,
        tmp_path / "prompts.jsonl",
        tmp_path / "best.jsonl",
        n=6,
        scorer=prefers_the_known_token,
        batch_size=8,
        progress=False,
        **SAMPLING,
    )
    assert summary["samples"] == 7 * 6 and summary["written"] == 7
    samples = data.read_jsonl(tmp_path / "best.jsonl.samples.jsonl")
    best = {r["id"]: r for r in data.read_jsonl(tmp_path / "best.jsonl")}
    lacking = 0
    for record in records[:-1]:
        drawn = [s for s in samples if s["id"].startswith(f"{record['id']}#")]
        with_token = [s for s in drawn if record["prefer"] in s["tokens"]]
        lacking += len(with_token) < len(drawn)
        assert with_token, record  # top-2 sampling draws the greedy token in some of the 6 samples
        assert best[record["id"]]["score"] == 1.0
        kept = best[record["id"]]["text"][len(record["prompt"]) :]
        assert kept == with_token[0]["text"]  # the first (lowest k) of the preferred samples
    assert lacking >= 3  # the choice mattered: those prompts also had samples without the token
    # The best-of-n file is SFT data for the train job: text records and a chat dialog.
    assert best["chat"]["messages"][-1]["role"] == "assistant"


def test_pairs_are_best_versus_worst_and_are_dpo_data(policy, tokenizer, tmp_path):
    records = write_prompts(tmp_path / "prompts.jsonl", policy, tokenizer)
    rejection.run(
        policy,
        tokenizer,
        tmp_path / "prompts.jsonl",
        tmp_path / "pairs.jsonl",
        n=6,
        scorer=prefers_the_known_token,
        output_kind="pairs",
        batch_size=8,
        progress=False,
        **SAMPLING,
    )
    pairs = data.read_jsonl(tmp_path / "pairs.jsonl")
    samples = data.read_jsonl(tmp_path / "pairs.jsonl.samples.jsonl")
    mixed = [
        r["id"]
        for r in records
        if len({r["prefer"] in s["tokens"] for s in samples if s["id"].startswith(f"{r['id']}#")}) == 2
    ]
    assert [p["id"] for p in pairs] == mixed  # prompts whose samples all score the same are ties, left out
    assert len(mixed) >= 3
    assert all(p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0 for p in pairs)
    examples = dpo.load_pairs(tmp_path / "pairs.jsonl", tokenizer, seq_len=32)
    assert len(examples) == len(mixed)


def test_a_reward_model_scores_by_a_tokens_logit(policy, tokenizer):
    scorer = rejection.RewardModelScorer(policy, tokenizer, token_id=42)
    prompt = tokenizer.encode("Hello", bos=True, eos=False)
    scores = scorer(prompt, [[1, 2], [3]])
    logits = policy(__import__("jax").numpy.array([prompt + [1, 2]]))
    assert abs(scores[0] - float(logits[0, -1, 42])) < 1e-4


def command(tmp_path, prompts) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llama_jax",
        "rejection",
        "--input",
        str(prompts),
        "--output",
        str(tmp_path / "best.jsonl"),
        "--n",
        "6",
        "--scorer",
        "tests.test_rejection:prefers_the_known_token",
        "--config.batch_size=2",
        "--config.max_new_tokens=4",
        "--config.temperature=1.0",
        "--config.top_k=2",
        "--config.top_p=1.0",
        "--seed",
        "3",
        "--no-progress",
    ]


def test_killed_with_sigkill_and_restarted_the_output_is_byte_identical(policy, tokenizer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, policy, tokenizer)
    uninterrupted = tmp_path / "whole"
    uninterrupted.mkdir()
    rejection.run(
        policy,
        tokenizer,
        prompts,
        uninterrupted / "best.jsonl",
        n=6,
        scorer=prefers_the_known_token,
        batch_size=2,
        progress=False,
        **SAMPLING,
    )

    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(command(tmp_path, prompts), cwd=ROOT, env=env, stderr=subprocess.PIPE)
    samples = tmp_path / "best.jsonl.samples.jsonl"
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and proc.poll() is None
        and (not samples.exists() or samples.read_bytes().count(b"\n") < 8)
    ):
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()  # still running: the kill lands mid-job
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "best.jsonl").exists()
    done = subprocess.run(command(tmp_path, prompts), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["batch"]["skipped"] >= 8  # the samples drawn before the kill were kept
    assert (tmp_path / "best.jsonl").read_bytes() == (uninterrupted / "best.jsonl").read_bytes()
    assert samples.read_bytes() == (uninterrupted / "best.jsonl.samples.jsonl").read_bytes()


def test_the_config_file_sets_the_job_and_bad_settings_are_named(tmp_path):
    from llama_jax.cli import build_parser
    from llama_jax.jobs import jobs

    args = build_parser().parse_args(
        [
            "rejection",
            "--config",
            "rejection",
            "--n",
            "3",
            "--config.output_kind=best",
        ]
    )
    job = jobs.config_from_args(rejection.RejectionConfig, args)
    assert (job.n, job.output_kind, job.scorer) == (3, "best", "my_rewards:score")
    with pytest.raises(ValueError, match="scorer: expected 'module:function'"):
        rejection.load_scorer("no_colon")
    with pytest.raises(ValueError, match="exactly one of scorer"):
        rejection.run(None, None, tmp_path / "in.jsonl", tmp_path / "out.jsonl")


# ---- a reward model with a scalar head (HF LlamaForSequenceClassification) -------------------------------

PAD = 128004  # <|finetune_right_pad_id|>: the pad token of Llama 3.1 reward models


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny random transformers `LlamaForSequenceClassification` (one label), saved as HF saves it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        num_labels=1,
        pad_token_id=PAD,
    )
    hf = transformers.LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0.0, 1.0)  # rewards of order 1, so the relative bound means something
    path = tmp_path_factory.mktemp("rm") / "reward_model"
    hf.save_pretrained(path)
    return path, hf


def transformers_rewards(hf, rows: list[list[int]]) -> list[float]:
    """transformers' own scores: rows right-padded with pad_token_id, pooled at the last non-pad token."""
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()


def test_a_scalar_head_reward_model_scores_as_transformers_does(reward_model_dir, policy, tokenizer):
    path, hf = reward_model_dir
    model = llama_jax.load(path, dtype="float32")
    assert model.score.shape == (32, 1) and model.output is None
    scorer = rejection.reward_scorer(model, tokenizer, "scalar", pad_id=PAD)
    prompt = tokenizer.encode("Rate this:", bos=True, eos=False)
    samples = [[9906, 1917], [40, 1093, 433, 13, 128009], [2], [791, 4320, PAD]]  # ragged; the last ends in the pad
    ours = np.array(scorer(prompt, samples))
    ref = np.array(transformers_rewards(hf, [prompt + s for s in samples]))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) <= 1e-4, (ours, ref)
    assert abs(ours[3] - scorer(prompt, [[791, 4320]])[0]) <= 1e-5 * abs(ours[3])  # a trailing pad is not read

    with pytest.raises(ValueError, match="score head, no token logits"):
        rejection.reward_scorer(model, tokenizer, "token", "42")
    with pytest.raises(ValueError, match="reward_token is for reward_head='token'"):
        rejection.reward_scorer(model, tokenizer, "scalar", "42")
    with pytest.raises(ValueError, match="no score head"):
        rejection.reward_scorer(policy, tokenizer, "scalar")
    with pytest.raises(ValueError, match="sequence-classification head .* cannot generate"):
        llama_jax.generate(model, [prompt], max_new_tokens=2)


def test_a_score_head_of_the_wrong_shape_is_named(reward_model_dir, tmp_path):
    import shutil

    path, _ = reward_model_dir
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    config = json.loads((broken / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "a", "1": "b"}, {"a": 0, "b": 1}  # 2 labels; score.weight is [1, D]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'score.weight' .* has shape \[1, 32\], expected \[2, 32\]"):
        llama_jax.load(broken, dtype="float32")


def test_rejection_with_a_scalar_reward_model_keeps_what_transformers_scores_best(
    reward_model_dir, policy, tokenizer, tmp_path, monkeypatch
):
    from llama_jax.cli import build_parser
    from llama_jax.text.chat import ChatFormat

    path, hf = reward_model_dir
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))  # leave the process's JAX config alone
    records = write_prompts(tmp_path / "prompts.jsonl", policy, tokenizer, n=3)
    args = build_parser().parse_args(
        [
            "rejection",
            "--input",
            str(tmp_path / "prompts.jsonl"),
            "--output",
            str(tmp_path / "pairs.jsonl"),
            "--n",
            "4",
            "--config.output_kind=pairs",
            f"--config.reward_model={path}",
            "--config.reward_head=scalar",
            "--config.dtype=float32",
            "--config.max_new_tokens=4",
            "--config.top_k=2",
            "--config.temperature=1.0",
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert rejection.main(args) == 0
    samples = {s["id"]: s for s in data.read_jsonl(tmp_path / "pairs.jsonl.samples.jsonl")}
    pairs = {p["id"]: p for p in data.read_jsonl(tmp_path / "pairs.jsonl")}
    for record in records:
        if "messages" in record:
            prompt = ChatFormat(tokenizer).encode_dialog(record["messages"])
        else:
            prompt = tokenizer.encode(record["prompt"], bos=True, eos=False)
        drawn = [samples[f"{record['id']}#{k}"] for k in range(4)]
        ref = transformers_rewards(hf, [prompt + s["tokens"] for s in drawn])
        reply = [s["message"]["content"] if "message" in s else s["text"] for s in drawn]
        pair = pairs[record["id"]]
        assert pair["chosen"] == reply[int(np.argmax(ref))] and pair["rejected"] == reply[int(np.argmin(ref))]
        assert abs(pair["chosen_score"] - max(ref)) <= 1e-4 * max(map(abs, ref))


# ---- the README's post-training lines, run as written ------------------------------------------------------

# Only what makes the lines run on the embedded model in seconds; every other setting is the README's.
README_OVERRIDES = {
    "rejection": ["--config.max_new_tokens=4", "--config.temperature=1.0", "--config.top_k=2", "--config.top_p=1.0"]
    + ["--config.batch_size=8", "--no-progress"],
    "train": ["--checkpoint", "none", "--mesh", "none", "--steps", "2", "--batch-size", "2", "--config.grad_accum=1"]
    + ["--config.seq_len=32", "--config.export=none", "--workdir", "run", "--no-progress"],
}


def readme_line(command: str) -> list[str]:
    """The README's `python -m llama_jax <command> ...` line, as argv for `cli.main` (its comment dropped)."""
    import re
    import shlex

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    [line] = re.findall(rf"^python -m llama_jax {re.escape(command)}.*$", readme, flags=re.M)
    argv = shlex.split(line, comments=True)[3:]
    return [a.replace("mod:fn", "tests.test_rejection:prefers_the_known_token") for a in argv]


def test_the_readmes_rejection_then_dpo_lines_chain(policy, tokenizer, tmp_path, monkeypatch, capsys):
    from llama_jax import cli

    write_prompts(tmp_path / "prompts.jsonl", policy, tokenizer)
    monkeypatch.chdir(tmp_path)
    rejection_argv = readme_line("rejection --input prompts.jsonl")
    assert cli.main(rejection_argv + README_OVERRIDES["rejection"]) == 0, capsys.readouterr().err
    pairs = data.read_jsonl(tmp_path / "pairs.jsonl")
    assert pairs and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    train_argv = readme_line("train --config dpo")
    assert cli.main(train_argv + README_OVERRIDES["train"]) == 0, capsys.readouterr().err
    metrics = data.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics[-1]["step"] == 2 and metrics[-1]["pairs"] > 0


def test_dpo_given_best_of_n_records_names_the_line_and_the_flag(policy, tokenizer, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", policy, tokenizer, n=2)
    best = tmp_path / "best.jsonl"
    rejection.run(policy, tokenizer, tmp_path / "prompts.jsonl", best, n=2, scorer=prefers_the_known_token, **SAMPLING)
    with pytest.raises(ValueError, match=rf"^{best}:1: a best-of-n record .* --output-kind pairs"):
        dpo.load_pairs(best, tokenizer, seq_len=32)


def test_a_resume_with_other_sampling_settings_is_refused_unless_forced(policy, tokenizer, tmp_path):
    write_prompts(tmp_path / "prompts.jsonl", policy, tokenizer, n=2)
    job = dict(n=2, scorer=prefers_the_known_token, batch_size=8, progress=False)
    rejection.run(policy, tokenizer, tmp_path / "prompts.jsonl", tmp_path / "best.jsonl", **job, **SAMPLING)
    hotter = SAMPLING | {"temperature": 0.5}
    with pytest.raises(
        ValueError, match=r"best\.jsonl\.samples\.jsonl holds results made with .*temperature: 1\.0 -> 0\.5"
    ):
        rejection.run(policy, tokenizer, tmp_path / "prompts.jsonl", tmp_path / "best.jsonl", **job, **hotter)
    summary = rejection.run(
        policy, tokenizer, tmp_path / "prompts.jsonl", tmp_path / "best.jsonl", **job, **hotter, force_resume=True
    )
    assert summary["batch"]["skipped"] == summary["samples"] == 3 * 2  # nothing redrawn: forced, it resumed

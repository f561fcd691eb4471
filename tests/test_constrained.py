"""Constrained decoding: every output keeps to its request's JSON schema, regular expression or choice.

Outputs are checked by independent means (`jsonschema`, Python's `re`, string equality) over many
requests sampled at temperature 1 from random weights (the embedded default model), whose text is
noise unless the mask holds it to the constraint. Greedy constrained decoding is transformers' argmax
over the tokens the grammar allows, step by step; constrained requests share the engine's bursts with
unconstrained ones, survive preemption, and a batch job killed with SIGKILL resumes byte-identically; a constraint
that does not compile is an error line naming the request, and the job goes on.
"""

import json
import pathlib
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.inference import constrain, sampler
from llama_jax.inference.engine import Engine, Request
from llama_jax.inference.sampling import InvalidSampling, SamplingParams
from llama_jax.jobs import batch
from llama_jax.model import settings
from llama_jax.text import tools
from llama_jax.weights.default_model import default_model
from tests import checkpoints
from tests.processes import clean_env, sigkill_once_written

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The engine of the tests on the default model: the batch jobs' here, docs/BATCH.md's judge pipeline
# included (one set of programs); requests sample as the batch job's default, top-p 0.9.
ENGINE = dict(slots=8)
TOP_P = 0.9
# 11 pages of 16 positions: too few for 8 requests past 16 positions at once, so the engine preempts.
TIGHT = dict(slots=8, pages=12, page_size=16)
# The batch job killed mid-run: three times the engine's slots, so results are still to come at the kill.
KILLED_JOB = 24
VERDICT = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["good", "bad", "unsure"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "reason": {"type": "string", "maxLength": 12},
    },
    "required": ["verdict", "score", "reason"],
    "additionalProperties": False,
}
NESTED = {  # nesting, arrays, enums, and strings that must escape quotes and backslashes
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": '^[a-z"\\\\]{1,6}$'},
        "tags": {"type": "array", "items": {"enum": ["x", "y\\z", 'q"q']}, "minItems": 1, "maxItems": 3},
        "inner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 99}},
            "required": ["ok", "n"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "tags", "inner"],
    "additionalProperties": False,
}
TOOLS = [  # a request's custom tools, Meta's definition format: a reply under their call schema is a call
    {"name": "set_light", "description": "", "parameters": {"on": {"param_type": "bool"}}},
    {"name": "reset", "description": "", "parameters": {}},
]
REGEX = r"(cat|dog)-[0-9]{2,4}"
CHOICE = ("yes", "no", "it depends")


def requests_of(tokenizer, n: int) -> list[Request]:
    """n sampled requests, a fifth each: the verdict schema, the nested schema, the tools' call schema, the
    regex, the choice; every sixth unconstrained instead (they share the bursts)."""
    out = []
    for i in range(n):
        prompt = tokenizer.encode(f"Request {i}: answer", bos=True, eos=False)
        constraint = [
            dict(json_schema=VERDICT),
            dict(json_schema=NESTED),
            dict(json_schema=tools.tool_call_schema(TOOLS)),
            dict(regex=REGEX),
            dict(choice=CHOICE),
        ][i % 5]
        if i % 6 == 5:
            constraint = {}
        new_tokens = 64 if constraint else 16
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=TOP_P, seed=1000 + i, **constraint)
        out.append(Request(f"r{i}", prompt, params))
    return out


def check_output(params: SamplingParams, text: str) -> None:
    if params.json_schema is not None:
        jsonschema.validate(json.loads(text), json.loads(params.json_schema))
        if params.json_schema == json.dumps(tools.tool_call_schema(TOOLS)):
            assert tools.find_tool_call(text, ipython=False).name in {t["name"] for t in TOOLS}
    elif params.regex is not None:
        assert re.fullmatch(params.regex, text), text
    elif params.choice is not None:
        assert text in params.choice


@pytest.fixture(scope="module")
def default():
    return default_model(warn=False)


@pytest.fixture(scope="module")
def sampled(default, tokenizer):
    """Many requests at temperature 1 through one engine, and the engine."""
    engine = Engine(default, **ENGINE, tokenizer=tokenizer)
    requests = requests_of(tokenizer, 24)
    return requests, engine.generate(requests), engine


def test_every_sampled_output_keeps_to_its_constraint(sampled, tokenizer):
    requests, results, _ = sampled
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, Exception), result
        if request.params.constraint is None:
            continue
        assert result.stop_reason == "stop", (request.id, tokenizer.decode(result.tokens))
        check_output(request.params, tokenizer.decode(result.tokens))
    texts = {tokenizer.decode(r.tokens) for q, r in zip(requests, results, strict=True) if q.params.json_schema}
    assert len(texts) > 8  # sampled, not one output repeated
    assert any('\\"' in t or "\\\\" in t for t in texts)  # escapes were drawn and validated


def test_unconstrained_requests_in_a_constrained_burst_are_what_they_are_alone(sampled, default, tokenizer):
    requests, results, _ = sampled
    free = [(q, r) for q, r in zip(requests, results, strict=True) if q.params.constraint is None]
    alone = Engine(default, **ENGINE).generate([q for q, _ in free])
    assert [r.tokens for _, r in free] == [r.tokens for r in alone]


def test_preempted_constrained_requests_give_the_same_tokens(sampled, default, tokenizer):
    requests, results, engine = sampled
    tight = Engine(default, **TIGHT, tokenizer=tokenizer)
    again = tight.generate(requests[:8])
    assert engine.stats["preemptions"] == 0 and tight.stats["preemptions"] > 0
    assert [r.tokens for r in again] == [r.tokens for r in results[:8]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random transformers Llama over the full vocabulary, and our model of the same weights."""
    ckpt = tmp_path_factory.mktemp("constrained") / "ckpt"
    reference = checkpoints.hf_checkpoint(ckpt, vocab_size=128_256, dim=64, n_layers=2)
    return reference, llama_jax.load(ckpt, dtype="float32")


@pytest.mark.parametrize("constraint", [dict(json_schema=NESTED), dict(regex=REGEX), dict(choice=CHOICE)])
def test_greedy_constrained_decoding_is_transformers_argmax_over_the_allowed_tokens(tiny, tokenizer, constraint):
    reference, model = tiny
    params = SamplingParams(max_new_tokens=40, **constraint)
    prompt = tokenizer.encode("Give it:", bos=True, eos=False)
    [ours] = sampler.generate(model, [prompt], params, tokenizer=tokenizer)
    streamed = list(sampler.stream(model, prompt, params, tokenizer=tokenizer))

    grammars = constrain.Grammars.of(tokenizer, model.config.vocab_size)
    matcher = grammars.matcher(params, np.asarray(tokenizer.stop_tokens))
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            logits = reference(torch.tensor([ids])).logits[0, -1].numpy()
            bits = np.unpackbits(grammars.masks([matcher])[0].view(np.uint8), bitorder="little")
            token = int(np.argmax(np.where(bits[: len(logits)] == 1, logits, -np.inf)))
            if token in tokenizer.stop_tokens:
                break
            matcher.take(len(expected) + 1, token)
            expected.append(token)
            ids.append(token)
    assert list(ours.tokens) == expected == streamed
    assert ours.stop_reason == "stop"
    check_output(params, tokenizer.decode(expected))


def test_a_request_sets_at_most_one_constraint_declared_once_for_every_entry_point():
    with pytest.raises(InvalidSampling, match="regex: expected at most one of json_schema, regex, choice"):
        SamplingParams(max_new_tokens=4, json_schema=VERDICT, regex="a")
    with pytest.raises(InvalidSampling, match="json_schema: expected a JSON schema"):
        SamplingParams(max_new_tokens=4, json_schema="[1, 2]")
    with pytest.raises(InvalidSampling, match="choice: expected a non-empty list"):
        SamplingParams(max_new_tokens=4, choice="yes")
    # A schema object is kept as its text (params key programs and batch groups), keys in their order.
    assert SamplingParams(max_new_tokens=4, json_schema=VERDICT).json_schema == json.dumps(VERDICT)
    for name in ("json_schema", "regex", "choice"):
        assert name in batch.REQUEST_FIELDS
        assert settings.flag(batch.JobConfig, name) == "--" + name.replace("_", "-")


def test_a_batch_job_with_constraints_survives_sigkill_byte_identically_and_reports_bad_ones(
    default, tokenizer, tmp_path
):
    lines = [
        {"id": "bad-ref", "prompt": "x", "json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
        {"id": "bad-regex", "prompt": "x", "regex": "(unclosed"},
    ]
    for i in range(KILLED_JOB):
        constraint = [{"json_schema": VERDICT}, {"regex": REGEX}, {"choice": list(CHOICE)}, {}][i % 4]
        lines.append({"id": f"q{i}", "prompt": f"Question {i}?", "temperature": 1.0, **constraint})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = dict(batch_size=ENGINE["slots"], progress=False, max_new_tokens=48)
    whole = tmp_path / "whole.jsonl"
    summary = batch.run_batch(default, tokenizer, source, whole, **run)
    assert summary["completed"] == KILLED_JOB and summary["failed"] == 2
    errors = [json.loads(line) for line in whole.with_name("whole.jsonl.errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["line"]) for e in errors] == [("bad-ref", 1), ("bad-regex", 2)]
    assert "json_schema: cannot compile" in errors[0]["error"] and "regex: cannot compile" in errors[1]["error"]
    by_id = {r["id"]: r for r in map(json.loads, whole.read_text().splitlines())}
    for line in lines[2:]:
        params = SamplingParams(
            max_new_tokens=4, **{k: line[k] for k in ("json_schema", "regex", "choice") if k in line}
        )
        if params.constraint is not None:
            check_output(params, by_id[line["id"]]["text"])

    # The same job from the command line, killed with SIGKILL once its first results are written; a torn
    # line where a write was cut. Run again, it resumes: the file is the uninterrupted run's, byte for byte.
    resumed = tmp_path / "resumed.jsonl"
    command = [sys.executable, "-m", "llama_jax", "batch", "--input", str(source), "--output", str(resumed)]
    command += ["--batch-size", str(run["batch_size"]), "--max-new-tokens", str(run["max_new_tokens"])]
    written = sigkill_once_written(command, resumed, 1, cwd=ROOT, env=clean_env(ROOT), timeout=300)
    assert 1 <= written < KILLED_JOB
    resumed.write_bytes(resumed.read_bytes() + b'{"id": "q9", "text": "{\\"verd')
    done = subprocess.run(command, cwd=ROOT, env=clean_env(ROOT), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["torn_line_repaired"] and summary["skipped"] == written
    assert resumed.read_bytes() == whole.read_bytes()


def test_the_documented_judge_pipeline_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "docs/BATCH.md").read_text()
    section = text[text.index("### A judge pipeline") :]
    block = section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/BATCH.md", "exec"), {})
    best = [json.loads(line) for line in (tmp_path / "best.jsonl").read_text().splitlines()]
    verdicts = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert [b["id"] for b in best] == ["q1", "q2"] and len(verdicts) == 8
    for v in verdicts:
        assert json.loads(v["text"])["verdict"] in ("correct", "partly correct", "wrong")
    for b in best:  # the kept answer has its question's best score
        assert b["score"] == max(json.loads(v["text"])["score"] for v in verdicts if v["id"].startswith(b["id"] + "#"))

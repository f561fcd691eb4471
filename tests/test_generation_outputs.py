"""`generate`, `stream` and the engine give the outputs recorded before the two inference stacks became one.

The fixture (`tests/fixtures/generation_outputs.json`) was written by the code before the refactor
(`python -m tests.test_generation_outputs` rewrites it: only ever from a commit whose outputs are
trusted). Each case is a ragged batch on the tiny random Llama of `test_sampler`, greedy or seeded,
with the filters, stop tokens, logprobs and top-K alternatives; tokens must be equal, logprobs equal
to float32 rounding.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

import llama_jax
from llama_jax.inference import sampler
from llama_jax.inference.engine import Engine, Request
from llama_jax.inference.sampling import SamplingParams
from tests import checkpoints

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "generation_outputs.json"
VOCAB = 384
PROMPT_LENGTHS = (5, 16, 17, 1)
CASES = {
    "greedy": dict(max_new_tokens=12, stop_tokens=[]),
    "greedy_stops_logprobs": dict(max_new_tokens=12, stop_tokens=[70, 207, 150, 100], logprobs=True, top_logprobs=3),
    "seeded": dict(max_new_tokens=10, temperature=0.9, seed=3, stop_tokens=[]),
    "top_k_top_p_stops": dict(
        max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=5, stop_tokens=[286, 66, 287]
    ),
    "min_p_logprobs": dict(
        max_new_tokens=9, temperature=1.1, min_p=0.05, seed=7, stop_tokens=[18], logprobs=True, top_logprobs=2
    ),
    "per_prompt_seeds": dict(max_new_tokens=8, temperature=1.0, seed=[1, 2, 3, 4], stop_tokens=[16, 162]),
}
STREAM = dict(max_new_tokens=11, temperature=0.9, seed=4, stop_tokens=[308])


def _model(directory):
    checkpoints.hf_checkpoint(directory, vocab_size=VOCAB)
    return llama_jax.load(directory, dtype="float32")


def _prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def _as_json(result) -> dict:
    return dict(
        tokens=list(result.tokens),
        stop_reason=result.stop_reason,
        stop_token=result.stop_token,
        logprobs=None if result.logprobs is None else list(result.logprobs),
        top_logprobs=None if result.top_logprobs is None else [list(map(list, x)) for x in result.top_logprobs],
    )


def _engine_requests():
    prompts = _prompts()
    return [
        Request(f"{name}/{i}", p, SamplingParams(**{**case, "seed": i + 11 if "seed" in case else 0}))
        for name, case in CASES.items()
        for i, p in enumerate(prompts)
    ]


def outputs(model) -> dict:
    """What today's code gives for every case (the fixture's content)."""
    prompts = _prompts()
    record = {name: [_as_json(r) for r in sampler.generate(model, prompts, **case)] for name, case in CASES.items()}
    stream = sampler.stream(model, prompts[0], **STREAM)
    tokens = []
    try:
        while True:
            tokens.append(next(stream))
    except StopIteration as end:
        record["stream"] = dict(tokens=tokens, result=_as_json(end.value))
    engine = Engine(model, slots=3, pages=40, page_size=8, burst=4, prefill_chunk=16, prefill_rows=2)
    requests = _engine_requests()
    record["engine"] = {r.id: _as_json(out) for r, out in zip(requests, engine.generate(requests), strict=True)}
    return record


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return outputs(_model(tmp_path_factory.mktemp("hf"))), json.loads(FIXTURE.read_text())


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert got["tokens"] == want["tokens"], where
    assert (got["stop_reason"], got["stop_token"]) == (want["stop_reason"], want["stop_token"]), where
    for field in ("logprobs", "top_logprobs"):
        assert (got[field] is None) == (want[field] is None), f"{where}: {field}"
    if want["logprobs"] is not None:
        np.testing.assert_allclose(got["logprobs"], want["logprobs"], rtol=0, atol=1e-6, err_msg=where)
    if want["top_logprobs"] is not None:
        assert got["top_logprobs"][0] == want["top_logprobs"][0], where
        np.testing.assert_allclose(got["top_logprobs"][1], want["top_logprobs"][1], rtol=0, atol=1e-6, err_msg=where)


@pytest.mark.parametrize("case", list(CASES))
def test_generate_gives_the_recorded_outputs(recorded, case):
    got, want = recorded
    assert len(got[case]) == len(want[case]) == len(PROMPT_LENGTHS)
    for i, (g, w) in enumerate(zip(got[case], want[case], strict=True)):
        _assert_same(g, w, f"{case}, prompt {i}")


def test_stream_gives_the_recorded_tokens_and_result(recorded):
    got, want = recorded
    assert got["stream"]["tokens"] == want["stream"]["tokens"]
    _assert_same(got["stream"]["result"], want["stream"]["result"], "stream")


def test_the_engine_gives_the_recorded_outputs(recorded):
    got, want = recorded
    assert list(got["engine"]) == list(want["engine"])
    for request_id, w in want["engine"].items():
        _assert_same(got["engine"][request_id], w, request_id)


if __name__ == "__main__":  # rewrite the fixture from this commit's code
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        FIXTURE.write_text(json.dumps(outputs(_model(pathlib.Path(directory))), indent=None) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)

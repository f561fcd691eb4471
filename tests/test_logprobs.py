"""Log-probabilities are the model's own numbers: transformers' `log_softmax` of its logits, in fp32.

On one small random `LlamaForCausalLM` (transformers, the reference) loaded by us, for a ragged batch:
- each generated token's log-prob and its top-K alternatives (`logprobs`, `top_logprobs`),
- each prompt token's log-prob given the tokens before it (`prompt_logprobs`, vLLM's name), also with
  nothing generated (`max_new_tokens=0`, `llama_jax.score`): scoring a given text or a given completion,
- `logprobs_mode="processed"`: the log-softmax of the logits sampling draws from (tempered, filtered),
in `generate`, in the engine (prompts in several prefill chunks, a shared prefix) and in the batch job's
JSONL, whose scoring requests resume to the same bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.inference import sampler
from llama_jax.inference.engine import Engine, Request
from llama_jax.inference.sampling import SamplingParams, filter_logits
from llama_jax.jobs import batch
from tests import checkpoints

VOCAB = 384
PROMPT_LENGTHS = (5, 20, 9, 2)  # ragged; 20 spans two engine prefill chunks and two score blocks
RTOL, ATOL = 1e-5, 1e-6  # fp32: relative, with a floor for log-probs near 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, transformers') on the same random weights, fp32."""
    directory = tmp_path_factory.mktemp("hf")
    reference = checkpoints.hf_checkpoint(directory, vocab_size=VOCAB, n_layers=1)  # one layer: quick to compile
    return llama_jax.load(directory, dtype="float32"), reference


def _prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in PROMPT_LENGTHS]


def _reference_logprobs(reference, sequence, **processing) -> np.ndarray:
    """`[T, V]`: transformers' `log_softmax` of its float32 logits at every position of one sequence
    run alone (no padding, no cache); with `processing` (temperature, top_k, top_p, min_p), of those
    logits after temperature and filters."""
    with torch.no_grad():
        logits = reference(torch.tensor([sequence])).logits[0].float()
    if processing:
        logits = torch.from_numpy(np.asarray(filter_logits(logits.numpy(), **processing)))
    return torch.log_softmax(logits, dim=-1).numpy()


def _of_tokens(logp_tv, sequence, start: int) -> np.ndarray:
    """The log-prob of each token of `sequence` from index `start` on (position t - 1 predicts token t)."""
    return np.array([logp_tv[t - 1, sequence[t]] for t in range(start, len(sequence))])


def _check_result(result, prompt, reference, k: int = 0, **processing) -> None:
    """A `GenerationResult` asked for prompt, completion and top-K log-probs against transformers."""
    stop = [] if result.stop_token is None else [result.stop_token]
    sequence = [*prompt, *result.tokens, *stop]
    logp = _reference_logprobs(reference, sequence, **processing)
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
    np.testing.assert_allclose(result.prompt_logprobs[1:], _of_tokens(logp, prompt, 1), rtol=RTOL, atol=ATOL)
    want = _of_tokens(logp, sequence, len(prompt))
    np.testing.assert_allclose(result.logprobs, want[: len(result.tokens)], rtol=RTOL, atol=ATOL)
    if k:
        ids, values = (np.array(x) for x in result.top_logprobs)
        assert ids.shape == values.shape == (len(sequence) - len(prompt), k)
        rows = logp[len(prompt) - 1 : len(sequence) - 1]
        np.testing.assert_allclose(values, -np.sort(-rows, axis=-1)[:, :k], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(values, np.take_along_axis(rows, ids, axis=-1), rtol=RTOL, atol=ATOL)
        assert (np.diff(values, axis=-1) <= 0).all()  # most likely first


def test_generate_gives_prompt_completion_and_top_k_logprobs_of_transformers(models):
    model, reference = models
    prompts = _prompts()
    # Raw log-probs (the default) are the model's distribution whatever the temperature and filters.
    params = dict(max_new_tokens=6, temperature=0.9, top_k=50, seed=3, stop_tokens=[])
    results = sampler.generate(model, prompts, logprobs=True, top_logprobs=4, prompt_logprobs=True, **params)
    for prompt, result in zip(prompts, results, strict=True):
        assert len(result.tokens) == params["max_new_tokens"]
        _check_result(result, prompt, reference, k=4)
    # Asking for prompt log-probs changes no token (the same decode program; the prefill's last logits).
    others = sampler.generate(model, prompts, logprobs=True, top_logprobs=4, **params)
    assert [r.tokens for r in others] == [r.tokens for r in results]
    assert [r.logprobs for r in others] == [r.logprobs for r in results]
    assert all(r.prompt_logprobs is None for r in others)
    # `stream` yields the tokens of row 0 (its stream, `decoding.token_keys`) and returns its log-probs.
    stream = sampler.stream(model, prompts[0], logprobs=True, top_logprobs=4, prompt_logprobs=True, **params)
    tokens = []
    with pytest.raises(StopIteration) as end:
        while True:
            tokens.append(next(stream))
    assert tokens == list(results[0].tokens)
    _check_result(end.value.value, prompts[0], reference, k=4)


def test_processed_logprobs_are_those_of_the_tempered_filtered_logits(models):
    model, reference = models
    prompts = _prompts()
    processing = dict(temperature=0.7, top_k=40, top_p=0.8)
    results = sampler.generate(
        model,
        prompts,
        max_new_tokens=6,
        seed=5,
        stop_tokens=[],
        logprobs=True,
        top_logprobs=3,
        prompt_logprobs=True,
        logprobs_mode="processed",
        **processing,
    )
    for prompt, result in zip(prompts, results, strict=True):
        _check_result(result, prompt, reference, k=3, **processing)
    # Some prompt tokens lie outside the top-k/top-p set: their processed log-prob is -inf, not a number.
    scores = np.concatenate([r.prompt_logprobs[1:] for r in results])
    assert np.isneginf(scores).any() and np.isfinite(np.concatenate([r.logprobs for r in results])).all()


def test_score_a_text_or_a_given_completion_without_generating(models):
    model, reference = models
    prompts = _prompts()
    nothing = sampler.generate(model, prompts, max_new_tokens=0, prompt_logprobs=True)
    assert {(r.tokens, r.stop_reason, r.logprobs) for r in nothing} == {((), "length", None)}
    for prompt, scores in zip(prompts, llama_jax.score(model, prompts), strict=True):
        np.testing.assert_allclose(
            scores, _of_tokens(_reference_logprobs(reference, prompt), prompt, 1), rtol=RTOL, atol=ATOL
        )
    completions = [[7, 8, 9], [300], [1, 2], [42, 43, 44, 45]]
    for prompt, completion, scores in zip(
        prompts, completions, llama_jax.score(model, prompts, completions), strict=True
    ):
        sequence = [*prompt, *completion]
        want = _of_tokens(_reference_logprobs(reference, sequence), sequence, len(prompt))
        assert len(scores) == len(completion)
        np.testing.assert_allclose(scores, want, rtol=RTOL, atol=ATOL)


def test_the_engine_gives_transformers_logprobs_across_chunks_and_shared_prefixes(models):
    model, reference = models
    prompts = _prompts()
    shared = prompts[1][:16] + [5, 6, 7]  # the first two pages of prompt 1: taken from the prefix cache unless scored
    asked = dict(logprobs=True, top_logprobs=2, temperature=0.8, stop_tokens=[])  # one sampling mode
    requests = [
        Request(i, p, SamplingParams(max_new_tokens=4, seed=i, prompt_logprobs=True, **asked))
        for i, p in enumerate(prompts)
    ]
    requests += [
        Request("score", shared, SamplingParams(max_new_tokens=0, prompt_logprobs=True, **asked)),
        Request("plain", shared, SamplingParams(max_new_tokens=3, **asked)),
    ]
    engine = Engine(model, slots=2, pages=40, page_size=8, burst=3, prefill_chunk=16, prefill_rows=2)
    results = engine.generate(requests)
    for request, result in zip(requests[: len(prompts)], results[: len(prompts)], strict=True):
        _check_result(result, request.prompt, reference, k=2)
    scored = results[len(prompts)]
    assert scored.tokens == () and scored.logprobs == ()
    np.testing.assert_allclose(
        scored.prompt_logprobs[1:], _of_tokens(_reference_logprobs(reference, shared), shared, 1), rtol=RTOL, atol=ATOL
    )
    assert engine.stats["shared_tokens"] > 0  # the plain request took the pages the scored one wrote
    assert results[-1].prompt_logprobs is None


class _Tokens:
    """A stand-in tokenizer for a 384-token vocabulary: text is space-separated token ids."""

    stop_tokens = ()
    special_tokens: dict = {}  # no chat format

    def encode(self, text, bos, eos):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_the_batch_job_writes_logprobs_and_scoring_requests_resume_to_the_same_bytes(models, tmp_path):
    model, reference = models
    prompts = _prompts()
    lines = [
        {"id": f"s{i}", "prompt": " ".join(map(str, p)), "max_new_tokens": 0, "prompt_logprobs": True, "logprobs": True}
        for i, p in enumerate(prompts)
    ]
    lines += [{"id": f"g{i}", "prompt": " ".join(map(str, p)), "logprobs": True} for i, p in enumerate(prompts)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    output = tmp_path / "out.jsonl"

    def run():
        return batch.run_batch(
            model,
            _Tokens(),
            tmp_path / "in.jsonl",
            output,
            batch_size=2,
            progress=False,
            page_size=8,
            max_new_tokens=4,
            temperature=0.0,
        )

    assert run()["completed"] == len(lines)
    records = {r["id"]: r for r in map(json.loads, output.read_text().splitlines())}
    for i, prompt in enumerate(prompts):
        scored = records[f"s{i}"]
        assert scored["tokens"] == [] and scored["prompt_logprobs"][0] is None and scored["logprobs"] == []
        np.testing.assert_allclose(
            scored["prompt_logprobs"][1:],
            _of_tokens(_reference_logprobs(reference, prompt), prompt, 1),
            rtol=RTOL,
            atol=ATOL,
        )
        generated = records[f"g{i}"]
        sequence = [*prompt, *generated["tokens"]]
        want = _of_tokens(_reference_logprobs(reference, sequence), sequence, len(prompt))
        assert "prompt_logprobs" not in generated and len(generated["tokens"]) == 4
        np.testing.assert_allclose(generated["logprobs"], want, rtol=RTOL, atol=ATOL)

    whole = output.read_bytes()
    output.write_bytes(whole.splitlines(keepends=True)[0])  # killed after the first result
    summary = run()
    assert summary["skipped"] == 1 and summary["completed"] == len(lines) - 1
    assert output.read_bytes() == whole


def test_a_log_prob_of_minus_infinity_is_written_as_null():
    from llama_jax.inference.generation import GenerationResult
    from llama_jax.jobs.batch_files import JobRequest, result_line

    inf = float("-inf")
    params = SamplingParams(
        max_new_tokens=1,
        temperature=1.0,
        top_k=1,
        logprobs=True,
        top_logprobs=2,
        prompt_logprobs=True,
        logprobs_mode="processed",
    )
    request = JobRequest(1, "a", [5, 6], False, params, (("a", 0),))
    result = GenerationResult((7,), "length", None, (-0.0,), (((7, 3),), ((-0.0, inf),)), (None, inf))
    record = json.loads(result_line(request, "a", result, _Tokens(), None))
    assert (record["logprobs"], record["prompt_logprobs"]) == ([-0.0], [None, None])
    assert record["top_logprobs"] == {"ids": [[7, 3]], "logprobs": [[-0.0, None]]}

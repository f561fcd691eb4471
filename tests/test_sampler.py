"""The sampler: greedy decoding equals transformers' argmax, the cache equals the uncached forward,
sampling follows softmax(logits / T) restricted to its filters, compilation is bounded, and bad
requests fail with errors that name the prompt."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

import llama_jax
from llama_jax.inference import sampler, sampling
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.model import Llama
from tests import checkpoints

VOCAB = 384
# Ragged on purpose: 1 token, exactly one prompt bucket (16), one past it (17), and 3 prompts so the
# batch bucket (4) holds a padding row.
PROMPT_LENGTHS = (5, 16, 17, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our model, transformers' model): a random tiny GQA Llama with llama3 RoPE, norms != 1."""
    directory = tmp_path_factory.mktemp("hf")
    reference = checkpoints.hf_checkpoint(directory, vocab_size=VOCAB)
    return llama_jax.load(directory, dtype="float32"), reference


def ragged_prompts(lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]


def hf_logits(reference, tokens) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0].float().numpy()


def uncached_logits(model, sequences, length=48) -> list[np.ndarray]:
    """The plain forward pass (no cache) over each sequence, `[len(seq), V]` each.

    Right-padding to one length keeps it one compiled program; causal attention means the pad
    never changes the logits of the real positions before it.
    """
    padded = np.zeros((len(sequences), length), np.int32)
    for i, seq in enumerate(sequences):
        padded[i, : len(seq)] = seq
    logits = np.asarray(_forward(*nnx.split(model), padded))
    return [logits[i, : len(seq)] for i, seq in enumerate(sequences)]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---- greedy and the cache ----------------------------------------------------------------------------


def test_greedy_equals_transformers_argmax_at_every_step_for_a_ragged_batch(tiny):
    model, reference = tiny
    prompts = ragged_prompts()
    results = sampler.generate(model, prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.stop_reason == "length" and len(result.tokens) == 12
        # Causal: HF's logits at position t are its forward pass on the first t+1 tokens, so one
        # forward over prompt + generated gives the argmax after every prefix at once.
        logits = hf_logits(reference, prompt + list(result.tokens))
        expected = logits[len(prompt) - 1 : -1].argmax(-1)
        np.testing.assert_array_equal(result.tokens, expected)


def test_cached_decode_logits_equal_uncached_forward_logits_per_step(tiny):
    model, _ = tiny
    prompts = ragged_prompts((3, 9))
    steps = 6
    full = [
        p + list(r.tokens) for p, r in zip(prompts, sampler.generate(model, prompts, max_new_tokens=steps), strict=True)
    ]
    reference = uncached_logits(model, full)
    lengths = np.array([len(p) for p in prompts])
    padded = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    graphdef, state = nnx.split(model)
    _, cache = _prefill(graphdef, state, padded, KVCache.zeros(model.config, 2, 32, dtype=jnp.float32))
    for step in range(steps):
        positions = lengths - 1 + step  # each row feeds its own next token at its own position
        tokens = np.array([seq[pos] for seq, pos in zip(full, positions, strict=True)])
        cached, cache = _decode_step(graphdef, state, tokens[:, None], positions[:, None], cache)
        for row in range(2):
            np.testing.assert_allclose(cached[row, 0], reference[row][positions[row]], rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).prefill(tokens, cache)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(graphdef, state, tokens, positions, cache):
    return nnx.merge(graphdef, state).decode(tokens, positions, cache)


def test_logprobs_are_the_uncached_log_softmax_of_each_emitted_token(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    results = sampler.generate(model, prompts, max_new_tokens=7, temperature=0.8, seed=3, logprobs=True)
    sequences = [prompt + list(result.tokens) for prompt, result in zip(prompts, results, strict=True)]
    for prompt, result, logits in zip(prompts, results, uncached_logits(model, sequences), strict=True):
        logp = log_softmax(logits.astype(np.float64))  # untempered, as Meta's
        expected = [logp[len(prompt) - 1 + j, t] for j, t in enumerate(result.tokens)]
        assert result.logprobs is not None and len(result.logprobs) == len(result.tokens)
        np.testing.assert_allclose(result.logprobs, expected, rtol=1e-4, atol=1e-5)


def test_stop_token_ends_its_row_only_and_is_not_returned(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    free = sampler.generate(model, prompts, max_new_tokens=10, stop_tokens=[])
    stop = free[1].tokens[3]  # row 1 meets this token at step 3 (maybe earlier in other rows)
    results = sampler.generate(model, prompts, max_new_tokens=10, stop_tokens=[stop])
    for unstopped, result in zip(free, results, strict=True):
        if stop in unstopped.tokens:
            cut = unstopped.tokens.index(stop)
            assert result == sampler.GenerationResult(unstopped.tokens[:cut], "stop", stop_token=stop)
        else:
            assert result == sampler.GenerationResult(unstopped.tokens, "length")
    assert len(results[1].tokens) <= 3


def test_decode_loop_exits_as_soon_as_every_row_is_done(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    free = sampler.generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    stops = [r.tokens[i] for r, i in zip(free, (2, 4, 1, 3), strict=True)]
    job, state = sampler._run(model, prompts, sampler.SamplingParams(max_new_tokens=100, stop_tokens=stops))
    last_stop = max(min(r.tokens.index(s) for s in stops if s in r.tokens) for r in free)
    assert int(state.step) == last_stop + 1  # not 100: the while_loop checked `live` on device
    assert state.out.tokens.shape[1] == 128


def test_llama3_vocabulary_defaults_to_llama3_stop_tokens():
    config = LlamaConfig(vocab_size=128_256, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    model = nnx.eval_shape(lambda: Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    assert sampler.default_stop_tokens(model) == (128_001, 128_008, 128_009)
    small = nnx.eval_shape(lambda: Llama(config.replace(vocab_size=VOCAB), dtype=jnp.float32, rngs=nnx.Rngs(0)))
    assert sampler.default_stop_tokens(small) == ()


# ---- sampling -------------------------------------------------------------------------------------------


def test_top_k_1_is_greedy(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    greedy = sampler.generate(model, prompts, max_new_tokens=8)
    top1 = sampler.generate(model, prompts, max_new_tokens=8, temperature=1.5, top_k=1, seed=7)
    assert [r.tokens for r in top1] == [r.tokens for r in greedy]
    logits = jax.random.normal(jax.random.key(0), (64, 1000))
    np.testing.assert_array_equal(
        sampling.sample(jax.random.key(1), logits, temperature=2.0, top_k=1), np.argmax(logits, -1)
    )


FIXED_LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5], np.float32)
N_DRAWS = 40_000


def draw(**knobs) -> np.ndarray:
    """N_DRAWS samples from FIXED_LOGITS (one row per draw, each with its own key)."""
    logits = np.broadcast_to(FIXED_LOGITS, (N_DRAWS, FIXED_LOGITS.size))
    return np.asarray(sampling.sample(jax.random.key(123), logits, **knobs))


def assert_frequencies_match(samples: np.ndarray, probs: np.ndarray):
    counts = np.bincount(samples, minlength=probs.size)
    assert counts[probs == 0].sum() == 0, "a token with probability 0 was drawn"
    support = probs > 0
    expected = N_DRAWS * probs[support]
    # Per bin: within 5 binomial standard deviations; jointly: chi-square at the 1e-4 level.
    sigma = np.sqrt(N_DRAWS * probs[support] * (1 - probs[support]))
    assert np.all(np.abs(counts[support] - expected) <= 5 * sigma + 1e-9), (counts, expected)
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    assert chi2 <= scipy.stats.chi2.ppf(1 - 1e-4, df=max(1, support.sum() - 1)), chi2


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_sampling_frequencies_follow_softmax_of_logits_over_temperature(temperature):
    probs = np.exp(log_softmax(FIXED_LOGITS.astype(np.float64) / temperature))
    assert_frequencies_match(draw(temperature=temperature), probs)


def meta_nucleus(probs: np.ndarray, p: float) -> np.ndarray:
    """Meta's `sample_top_p` support: sort descending, keep where (cumsum - prob) <= p."""
    order = np.argsort(-probs, kind="stable")
    keep_sorted = np.cumsum(probs[order]) - probs[order] <= p
    keep = np.zeros(probs.shape, bool)
    keep[order[keep_sorted]] = True
    return keep


def test_filtered_sampling_frequencies_follow_the_renormalised_distribution():
    probs = np.exp(log_softmax(FIXED_LOGITS.astype(np.float64) / 0.9))
    for knobs, keep in [
        (dict(top_p=0.6), meta_nucleus(probs, 0.6)),
        (dict(top_k=3), probs >= np.sort(probs)[-3]),
        (dict(min_p=0.2), probs >= 0.2 * probs.max()),
    ]:
        expected = np.where(keep, probs, 0.0) / probs[keep].sum()
        assert 1 < keep.sum() < probs.size, knobs  # the filter bites, and leaves a choice
        assert_frequencies_match(draw(temperature=0.9, **knobs), expected)


def test_argmax_is_numpys_first_maximum():
    logits = np.array(jax.random.normal(jax.random.key(2), (16, 130_000)), np.float32)
    logits[3, [7, 90_000]] = 100.0  # a tie: the first index wins, as np.argmax
    logits[5] = 0.0
    np.testing.assert_array_equal(sampling.argmax(logits), np.argmax(logits, -1))


def test_categorical_follows_the_softmax_across_cdf_blocks():
    """Support spread over several `CDF_BLOCK`s, a ragged last block, and -inf everywhere else."""
    vocab = 3 * sampling.CDF_BLOCK + 77
    support = np.array([0, 5, sampling.CDF_BLOCK - 1, sampling.CDF_BLOCK, 2 * sampling.CDF_BLOCK + 3, vocab - 1])
    logits = np.full(vocab, -np.inf, np.float32)
    logits[support] = [1.0, -2.0, 0.5, 2.0, -0.5, 1.5]
    probs = np.exp(log_softmax(logits.astype(np.float64)))
    draws = sampling.categorical(
        jax.random.split(jax.random.key(4), N_DRAWS), np.broadcast_to(logits, (N_DRAWS, vocab))
    )
    assert_frequencies_match(np.asarray(draws), probs)


def test_inverse_cdf_never_picks_a_zero_weight_even_past_the_end():
    weights = np.array([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0]] * 4, np.float32)
    u = np.array([0.0, 0.4, 0.99, 1.0], np.float32)  # 1.0: u x total rounds onto the end
    np.testing.assert_array_equal(sampling._inverse_cdf(weights, u), [2, 4, 4, 4])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_keeps_exactly_metas_nucleus(temperature, top_p):
    logits = np.asarray(jax.random.normal(jax.random.key(5), (16, 5000)) * 3, np.float32)
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, temperature=temperature, top_p=top_p)))
    for row in range(logits.shape[0]):
        probs = np.exp(log_softmax(logits[row].astype(np.float64) / temperature))
        np.testing.assert_array_equal(kept[row], meta_nucleus(probs, top_p))
    samples = np.asarray(sampling.sample(jax.random.key(9), logits, temperature=temperature, top_p=top_p))
    assert kept[np.arange(logits.shape[0]), samples].all()


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_keeps_exactly_the_tokens_within_min_p_of_the_top(min_p):
    logits = np.asarray(jax.random.normal(jax.random.key(6), (16, 5000)) * 3, np.float32)
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, temperature=0.8, min_p=min_p)))
    probs = np.exp(log_softmax(logits.astype(np.float64) / 0.8))
    np.testing.assert_array_equal(kept, probs >= min_p * probs.max(-1, keepdims=True))
    for seed in range(5):
        samples = np.asarray(sampling.sample(jax.random.key(seed), logits, temperature=0.8, min_p=min_p))
        assert kept[np.arange(16), samples].all()


def test_generated_tokens_stay_in_the_nucleus_of_their_step(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    for knobs in (dict(top_p=0.3), dict(top_k=5, top_p=0.5, min_p=0.6)):
        results = sampler.generate(model, prompts, max_new_tokens=10, temperature=0.7, seed=1, **knobs)
        sequences = [prompt + list(result.tokens) for prompt, result in zip(prompts, results, strict=True)]
        for prompt, result, logits in zip(prompts, results, uncached_logits(model, sequences), strict=True):
            logits = logits[len(prompt) - 1 : -1]
            kept = np.isfinite(np.asarray(sampling.filter_logits(logits, temperature=0.7, **knobs)))
            assert kept[np.arange(len(result.tokens)), list(result.tokens)].all(), knobs


def test_same_seed_same_tokens_other_seed_other_tokens(tiny):
    model, _ = tiny
    prompts = ragged_prompts()

    def run(seed):
        return [r.tokens for r in sampler.generate(model, prompts, max_new_tokens=16, temperature=1.0, seed=seed)]

    assert run(0) == run(0)
    assert run(0) != run(1)
    # Each row has its own stream: a prompt samples the same alone as in a batch.
    alone = sampler.generate(model, prompts[:1], max_new_tokens=16, temperature=1.0, seed=0)
    assert alone[0].tokens == run(0)[0]


def test_per_prompt_seeds_make_each_sample_independent_of_its_row_and_batch(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    seeds = [11, 12, 13, 14]
    knobs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    batched = sampler.generate(model, prompts, seed=seeds, **knobs)
    for prompt, seed, result in zip(prompts, seeds, batched, strict=True):
        assert sampler.generate(model, [prompt], seed=seed, **knobs)[0] == result
    order = [2, 0, 3, 1]  # other rows, other neighbours, a smaller batch: the same samples
    shuffled = sampler.generate(model, [prompts[i] for i in order], seed=[seeds[i] for i in order], **knobs)
    assert shuffled == [batched[i] for i in order]
    assert sampler.generate(model, prompts[1:3], seed=seeds[1:3], **knobs) == batched[1:3]
    assert len({r.tokens for r in batched}) == len(prompts)  # the streams differ from one another
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        sampler.generate(model, prompts, seed=seeds[:3], **knobs)


def test_top_logprobs_are_the_k_best_of_the_uncached_log_softmax_including_the_stop_token(tiny):
    model, _ = tiny
    prompts = ragged_prompts()
    k = 5
    free = sampler.generate(model, prompts, max_new_tokens=10, temperature=0.9, seed=2, stop_tokens=[])
    stop = free[0].tokens[4]
    results = sampler.generate(
        model, prompts, max_new_tokens=10, temperature=0.9, seed=2, stop_tokens=[stop], top_logprobs=k, logprobs=True
    )
    assert any(r.stop_reason == "stop" for r in results) and any(r.stop_reason == "length" for r in results)
    sequences = [
        p + list(r.tokens) + ([r.stop_token] if r.stop_token is not None else [])
        for p, r in zip(prompts, results, strict=True)
    ]
    for prompt, result, seq, logits in zip(prompts, results, sequences, uncached_logits(model, sequences), strict=True):
        ids, logps = result.top_logprobs
        n = len(seq) - len(prompt)  # every generated token, the stop token included
        assert len(ids) == len(logps) == n and all(len(row) == k for row in ids + logps)
        reference = log_softmax(logits.astype(np.float64))[len(prompt) - 1 : len(seq) - 1]
        for step in range(n):
            expected = np.sort(reference[step])[::-1][:k]
            np.testing.assert_allclose(logps[step], expected, rtol=1e-4, atol=1e-5)  # most likely first
            np.testing.assert_allclose(reference[step][list(ids[step])], logps[step], rtol=1e-4, atol=1e-5)
        # The token taken at each step has the log-probability `logprobs` reports for it.
        for step, (token, logp) in enumerate(zip(result.tokens, result.logprobs, strict=True)):
            if token in ids[step]:
                assert logps[step][ids[step].index(token)] == pytest.approx(logp, abs=1e-6)
    assert sampler.generate(model, prompts, max_new_tokens=3)[0].top_logprobs is None


def test_min_batch_pads_with_idle_rows_that_change_nothing(tiny):
    model, _ = tiny
    prompts = ragged_prompts((5, 9))
    knobs = dict(max_new_tokens=6, temperature=0.9, seed=[3, 4])
    job, state = sampler._run(model, prompts, sampler.SamplingParams(**knobs), min_batch=6)
    assert state.out.tokens.shape[0] == 8 and not job.state.live[2:].any()  # 6 rounded to a power of two, idle
    assert int(state.step) == 6  # idle rows do not keep the loop going, nor stop it early
    assert sampler.generate(model, prompts, **knobs, min_batch=6) == sampler.generate(model, prompts, **knobs)


def test_stream_yields_what_generate_returns(tiny):
    model, _ = tiny
    prompt = ragged_prompts((7,))[0]
    expected = sampler.generate(model, [prompt], max_new_tokens=9, temperature=0.9, seed=4)[0]
    for chunk in (1, 4):
        tokens = sampler.stream(model, prompt, max_new_tokens=9, temperature=0.9, seed=4, chunk=chunk)
        seen = []
        with pytest.raises(StopIteration) as stop:
            while True:
                seen.append(next(tokens))
        assert tuple(seen) == expected.tokens
        assert stop.value.value == expected


# ---- compilation ----------------------------------------------------------------------------------------


def test_a_stream_of_differently_sized_requests_compiles_a_bounded_number_of_times(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    # Batch sizes 1..4 -> buckets {1, 2, 4}; prompt lengths 1..30 -> {16, 32}; new tokens 1..16 -> {16}.
    requests = [
        (ragged_prompts(rng.integers(1, 31, size=rng.integers(1, 5)), seed=i), int(rng.integers(1, 17)))
        for i in range(14)
    ]
    before = sampler.trace_counts()
    outputs = [sampler.generate(model, prompts, max_new_tokens=n) for prompts, n in requests]
    after = sampler.trace_counts()
    bound = 3 * 2 * 1  # batch buckets x prompt buckets x new-token buckets
    assert after["prefill"] - before["prefill"] <= bound
    assert after["decode"] - before["decode"] <= bound
    # Every request got what it asked for, and the same stream again compiles nothing.
    assert all(len(r.tokens) == n for (_, n), out in zip(requests, outputs, strict=True) for r in out)
    for prompts, n in requests:
        sampler.generate(model, prompts, max_new_tokens=n)
    assert sampler.trace_counts() == after


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_context_model(tiny):
    """The tiny model (shared weights) with a 32-position context."""
    model = nnx.merge(*nnx.split(tiny[0]))
    model.config = model.config.replace(max_seq_len=32)
    return model


@pytest.mark.parametrize(
    "prompts, max_new_tokens, message",
    [
        ([[1, 2], [3] * 40], 1, r"prompt 1 has 40 tokens.*context of 32"),
        ([[3] * 30], 5, r"prompt 0 has 30 tokens; with max_new_tokens=5 it needs 35 positions.*32"),
        ([[1, 2], [3], []], 4, r"prompt 2 is empty"),
        ([[1, 2, 3, VOCAB]], 4, rf"prompt 0: token id {VOCAB} at position 3 is outside the vocabulary \[0, {VOCAB}\)"),
        ([[5, -1]], 4, r"prompt 0: token id -1 at position 1"),
        ([], 4, r"non-empty list"),
        ([1, 2, 3], 4, r"list of token-id lists"),
        ([[1, 2]], -1, r"max_new_tokens: expected an integer >= 0"),
    ],
)
def test_bad_prompts_raise_a_value_error_naming_the_prompt(short_context_model, prompts, max_new_tokens, message):
    with pytest.raises(ValueError, match=message):
        sampler.generate(short_context_model, prompts, max_new_tokens=max_new_tokens)


def test_stream_checks_the_request_when_called_not_at_the_first_token(short_context_model):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sampler.stream(short_context_model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 has 30 tokens"):
        sampler.stream(short_context_model, [1] * 30, max_new_tokens=3)


@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=-1), "top_k"),
        (dict(temperature=1.0, top_k=VOCAB + 1), "top_k"),
        (dict(temperature=1.0, min_p=-0.1), "min_p"),
        (dict(stop_tokens=[VOCAB + 5]), "stop_tokens: token"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_sampling_parameters_raise_a_value_error(short_context_model, knobs, message):
    with pytest.raises(ValueError, match=message):
        sampler.generate(short_context_model, [[1, 2]], max_new_tokens=2, **knobs)


def test_a_model_sharded_over_a_mesh_generates_the_same_tokens(tmp_path):
    checkpoints.hf_checkpoint(tmp_path, vocab_size=VOCAB)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = llama_jax.load(tmp_path, dtype="float32", mesh=mesh)
    single = llama_jax.load(tmp_path, dtype="float32")
    prompts = ragged_prompts()
    for knobs in (dict(), dict(temperature=0.9, top_p=0.8, seed=2)):
        expected = sampler.generate(single, prompts, max_new_tokens=8, **knobs)
        assert sampler.generate(sharded, prompts, max_new_tokens=8, **knobs) == expected


# ---- SamplingParams: one validated value for every entry point --------------------------------------


def test_sampling_params_validate_once_and_name_the_field():
    for fields, field in [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, top_k=2.5), "top_k"),
        (dict(max_new_tokens=4, seed=[1, -2]), "seed"),
        (dict(max_new_tokens=4, logprobs="yes"), "logprobs"),
    ]:
        with pytest.raises(ValueError, match=rf"^{field}: expected") as error:
            sampling.SamplingParams(**fields)
        assert error.value.field == field  # what the batch job reports per request line
    with pytest.raises(ValueError, match=r"top_k: expected an integer in \[0, 10\]"):
        sampling.SamplingParams(max_new_tokens=4, top_k=11).check_vocab(10)


def test_sampling_params_split_into_a_static_mode_and_traced_knobs():
    hot = sampling.SamplingParams.meta(max_new_tokens=8, seed=[3, 4])
    assert (hot.temperature, hot.top_p, hot.seed) == (0.6, 0.9, (3, 4))  # Meta's defaults; lists become tuples
    assert hot.mode == sampling.Mode(greedy=False, top_k=0, top_p=True, min_p=False, logprobs=False)
    np.testing.assert_array_equal(hot.knobs(), np.float32([0.6, 0.9, 0.0]))
    # Values that only change the traced knobs keep the mode, so the compiled program is reused.
    assert dataclasses.replace(hot, temperature=1.3, top_p=0.5).mode == hot.mode
    greedy = sampling.SamplingParams(max_new_tokens=8, top_p=0.5, top_k=3)
    assert greedy.canonical() == sampling.SamplingParams(max_new_tokens=8)  # greedy ignores the filters
    assert hash(hot) == hash(sampling.SamplingParams.meta(max_new_tokens=8, seed=(3, 4)))


def test_generate_takes_sampling_params_or_the_same_fields_as_keywords(tiny):
    model, _ = tiny
    prompts = ragged_prompts((5, 9))
    params = sampling.SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=[3, 4])
    by_params = sampler.generate(model, prompts, params)
    assert by_params == sampler.generate(model, prompts, max_new_tokens=6, temperature=0.9, top_k=20, seed=[3, 4])
    assert sampler.generate(model, prompts, params, temperature=0.0) == sampler.generate(
        model, prompts, max_new_tokens=6, seed=[3, 4]
    )

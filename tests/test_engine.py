"""The continuous-batching engine: every request gets what `generate` gives it alone (greedy: also
transformers' argmax), whatever it was batched with, its slot, its admission order, page exhaustion,
preemption or prefix sharing; a request that cannot run gets an error and the others go on."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.inference import decoding, sampler
from llama_jax.inference import engine as engine_module
from llama_jax.inference.decoding import Rows, Weights
from llama_jax.inference.engine import Engine, Request
from llama_jax.inference.generation import MAX_STOP_TOKENS
from llama_jax.inference.sampling import SamplingParams
from llama_jax.model import attention
from llama_jax.model.paged_cache import NULL_PAGE, PagedKVCache, PagePool
from tests import checkpoints
from tests.test_decode_program import weight_copies_in_decode_loop

VOCAB = 384
STOP = (5, 7)  # frequent enough in a random model to end some requests early
N = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    reference = checkpoints.hf_checkpoint(directory, vocab_size=VOCAB)
    return llama_jax.load(directory, dtype="float32"), reference


def prompts(n=10, seed=0, longest=45):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(k)).tolist() for k in rng.integers(1, longest, size=n)]


# One small configuration (few compiled programs): 3 slots, pages of 8, bursts of 4, chunks of 16.
def engine(model, **kwargs):
    settings = dict(slots=3, pages=40, page_size=8, burst=4, prefill_chunk=16, prefill_rows=2)
    return Engine(model, **{**settings, **kwargs})


def request(id, prompt, max_new_tokens=N, **sampling):
    return Request(id, prompt, SamplingParams(**{"max_new_tokens": max_new_tokens, "stop_tokens": STOP, **sampling}))


def test_paged_attention_equals_dense_attention_over_the_gathered_pages():
    rng = np.random.default_rng(0)
    b, t, n, k, h, page, m = 3, 5, 4, 2, 8, 4, 8
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(20, page, k, h)), jnp.float32) for _ in range(2))
    table = np.stack([rng.permutation(np.arange(1, 20))[:m] for _ in range(b)]).astype(np.int32)
    table[2, 5:] = NULL_PAGE  # a short row: its tail is the null page
    q_index = np.asarray([[3, 4, 5, 6, 7], [25, 26, 27, 28, 29], [0, 1, 2, 17, 19]], np.int32)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    cache = PagedKVCache(k_pages[None], v_pages[None], jnp.asarray(table), block_pages=2)
    got = cache.attend(0, q, jnp.asarray(q_index))
    k_row, v_row = (x[table].reshape(b, m * page, k, h) for x in (k_pages, v_pages))
    want = attention.attend(q, k_row, v_row, q_index, backend="dense")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_page_pool_counts_references_and_keeps_prompt_blocks_for_reuse():
    pool = PagePool(5)
    a = pool.allocate(2)
    pool.register(a[0], b"block0")
    assert pool.lookup([b"block0", b"block1"]) == [a[0]]  # the longest cached prefix, referenced again
    pool.release(a)
    pool.release([a[0]])
    assert pool.available() == 4 and pool.lookup([b"block0"]) == [a[0]]  # cached at refcount 0, reused
    assert pool.allocate(4) is None  # never more than there is
    pool.release([a[0]])
    assert sorted(pool.allocate(4)) == [1, 2, 3, 4]  # the cached block is reclaimed last
    assert pool.lookup([b"block0"]) == []


# prefill_budget 16: one 16-token chunk between bursts, so longer prompts are prefilled across bursts.
@pytest.mark.parametrize("prefill_budget", [None, 16])
def test_greedy_equals_generate_and_transformers_whatever_the_batching(tiny, prefill_budget):
    model, reference = tiny
    ps = prompts()
    want = sampler.generate(model, ps, max_new_tokens=N, stop_tokens=STOP)
    got = engine(model, prefill_budget=prefill_budget).generate([request(i, p) for i, p in enumerate(ps)])
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [g.stop_reason for g in got] == [w.stop_reason for w in want]
    alone = engine(model).generate([request(0, ps[3])])  # batched with nobody
    assert alone[0].tokens == want[3].tokens
    for p, g in zip(ps[:4], got[:4], strict=True):  # transformers' argmax, one prompt at a time
        with torch.no_grad():
            out = reference.generate(torch.tensor([p]), max_new_tokens=N, do_sample=False, eos_token_id=list(STOP))
        hf = out[0, len(p) :].tolist()
        assert list(g.tokens) == [t for t in hf if t not in STOP][: len(g.tokens)] and len(hf) >= len(g.tokens)


def test_sampled_tokens_depend_on_the_seed_not_on_admission_order(tiny):
    model, _ = tiny
    ps = prompts(seed=1)
    seeds = [100 + i for i in range(len(ps))]
    want = sampler.generate(
        model, ps, max_new_tokens=N, temperature=1.0, top_p=0.9, seed=seeds, stop_tokens=STOP, top_logprobs=2
    )
    sampled = dict(temperature=1.0, top_p=0.9, top_logprobs=2)
    requests = [request(i, p, seed=s, **sampled) for i, (p, s) in enumerate(zip(ps, seeds, strict=True))]
    eng = engine(model)
    forward = eng.generate(requests)
    backward = eng.generate(requests[::-1])[::-1]
    assert [r.tokens for r in forward] == [r.tokens for r in backward] == [w.tokens for w in want]
    assert any(w.stop_reason == "stop" for w in want) and any(w.stop_reason == "length" for w in want)
    for g, w in zip(forward, want, strict=True):
        assert g.stop_token == w.stop_token and g.top_logprobs[0] == w.top_logprobs[0]
        np.testing.assert_allclose(g.top_logprobs[1], w.top_logprobs[1], atol=1e-5)


def test_page_exhaustion_preempts_and_recomputes_without_losing_a_result(tiny):
    model, _ = tiny
    ps = prompts(seed=2)
    want = sampler.generate(model, ps, max_new_tokens=N, temperature=1.0, seed=list(range(len(ps))), stop_tokens=STOP)
    # 9 usable pages of 8 for 3 slots of up to 56 positions: requests wait, and decoding ones are preempted.
    eng = engine(model, pages=10)
    got = eng.generate([request(i, p, seed=i, temperature=1.0) for i, p in enumerate(ps)])
    assert eng.stats["preemptions"] > 0
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert eng.pool.available() == 9  # every page came back


def test_a_request_that_cannot_run_gets_an_error_and_the_others_go_on(tiny):
    model, _ = tiny
    ps = prompts(n=3, seed=3)
    too_long = request("long", [1] * 40, model.config.max_seq_len)
    too_big = request("big", [1] * 20, 300)  # fits the context, not the 39 pages of 8
    bad = request("bad", [VOCAB], 4)
    results = engine(model).generate([request(0, ps[0]), too_long, too_big, bad, request(1, ps[1])])
    assert "prompt too long" in str(results[1]) and "context" in str(results[1])
    assert "pages" in str(results[2]) and "outside the vocabulary" in str(results[3])
    want = sampler.generate(model, ps[:2], max_new_tokens=N, stop_tokens=STOP)
    assert [results[0].tokens, results[4].tokens] == [w.tokens for w in want]


def test_prefix_sharing_prefills_a_common_prefix_once_and_changes_no_token(tiny):
    model, _ = tiny
    system = prompts(n=1, seed=4, longest=2)[0] + list(range(10, 43))  # 33+ tokens: 4 full pages of 8
    ps = [system + p for p in prompts(n=6, seed=5, longest=12)]
    requests = [request(i, p, seed=i, temperature=1.0) for i, p in enumerate(ps)]
    requests += [request(f"0#{k}", ps[0], seed=50 + k, temperature=1.0) for k in range(3)]  # n=3 of one prompt
    shared, unshared = engine(model), engine(model, prefix_cache=False)
    with_sharing, without = shared.generate(requests), unshared.generate(requests)
    assert [r.tokens for r in with_sharing] == [r.tokens for r in without]
    assert unshared.stats["shared_tokens"] == 0
    assert shared.stats["shared_tokens"] >= 4 * 8 * (len(requests) - 3)  # all but one copy per slot wave
    want = sampler.generate(
        model,
        [r.prompt for r in requests],
        max_new_tokens=N,
        temperature=1.0,
        seed=[r.params.seed for r in requests],
        stop_tokens=STOP,
    )
    assert [r.tokens for r in with_sharing] == [w.tokens for w in want]


def test_the_prefix_sharing_bound_of_the_benchmark_counts_the_tokens_the_engine_shares(tiny):
    """`benchmarks/engine.py` bounds what sharing can save from the prompts alone (each prompt's leading
    whole pages that an earlier one holds); with pages to spare the engine shares exactly those."""
    from benchmarks.engine import prefix_sharing_bound

    model, _ = tiny
    system = list(range(10, 30))  # 2 full pages of 8, and 4 tokens into the third
    ps = [system + p for p in prompts(n=5, seed=6, longest=12)] + [system[:11]]
    shared = engine(model, pages=200)
    results = shared.generate([request(i, p) for i, p in enumerate(ps)])
    bound = prefix_sharing_bound(model.config, ps, [r.tokens for r in results], page=8)
    assert bound["shared_tokens"] == shared.stats["shared_tokens"] == 4 * 16 + 8
    computed = len(ps[0]) + sum(len(p) - 16 for p in ps[1:-1]) + len(ps[-1]) - 8
    assert 1 < bound["speedup_bound"] < sum(map(len, ps)) / computed  # decode and attention are not shared


def test_one_engine_runs_requests_with_different_settings_each_as_generate_alone(tiny):
    """Per-request SamplingParams: greedy, two temperatures with top-p (one mode, per-row knobs), top-k with
    logprobs, and other stop tokens, mixed in one engine and one page pool, slots shared."""
    model, _ = tiny
    ps = prompts(n=8, seed=6)
    settings = [
        dict(),
        dict(temperature=0.7, top_p=0.9, seed=1),
        dict(temperature=1.3, top_p=0.5, seed=2),
        dict(temperature=1.0, top_k=20, logprobs=True, seed=3),
        dict(temperature=1.0, seed=4, stop_tokens=(9,)),
    ]
    requests = [request(i, p, **settings[i % len(settings)]) for i, p in enumerate(ps)]
    before = engine_module.trace_counts()
    got = engine(model).generate(requests)
    compiled = {k: v - before[k] for k, v in engine_module.trace_counts().items()}
    for r, g in zip(requests, got, strict=True):
        [want] = sampler.generate(model, [list(r.prompt)], r.params)
        assert g.tokens == want.tokens and g.stop_reason == want.stop_reason, r.id
        if r.params.logprobs:
            np.testing.assert_allclose(g.logprobs, want.logprobs, atol=1e-5)
    # One program per static mode (greedy; top-p; top-k + logprobs; plain sampling), not per setting.
    assert compiled["decode"] <= 4 and compiled["prefill"] <= 4


def test_a_decode_burst_reads_and_writes_the_page_pool_in_place(tiny):
    """The burst's loop gathers key blocks straight from the `[L, P, page, K, H]` pool and scatters new
    entries into it: no layer of the pool (`[P, page, K, H]`) is sliced out or copied per step."""
    model, _ = tiny
    eng = engine(model)
    b, params, zeros = eng.slots, SamplingParams(max_new_tokens=4), np.zeros(eng.slots, np.int32)
    rows = Rows(
        np.zeros(b, np.uint32), zeros, np.stack([params.knobs()] * b), np.full((b, MAX_STOP_TOKENS), -1, np.int32)
    )
    state = eng._state(
        [None] * b,
        rows,
        params.mode,
        n_out=eng.burst,
        last=zeros,
        positions=zeros,
        count=zeros,
        limit=zeros + 4,
        live=np.ones(b, bool),
    )
    lowered = decoding.decode.lower(Weights.of(model), state, np.int32(eng.burst))
    layer_pool = int(np.prod(eng.k.shape[1:]))
    assert weight_copies_in_decode_loop(lowered.compile().as_text(), {layer_pool}) == []


def test_generate_stream_and_the_engine_run_the_same_two_programs_on_dataclass_state(tiny, monkeypatch):
    """One inference path: `decoding.prefill` and `decoding.decode` for every caller, each on its cache
    (contiguous for generate/stream, the page pool for the engine), their inputs registered dataclasses."""
    model, _ = tiny
    calls = set()

    def spying(name, real):
        def spy(weights, state, *rest):
            assert isinstance(weights, Weights) and isinstance(state, decoding.DecodeState)
            assert all(isinstance(x, decoding.Prompt) or np.ndim(x) == 0 for x in rest)
            calls.add((name, type(state.cache).__name__))
            return real(weights, state, *rest)

        return spy

    for name in ("prefill", "decode"):
        monkeypatch.setattr(decoding, name, spying(name, getattr(decoding, name)))
    prompt = prompts(n=1, seed=9)[0]
    sampler.generate(model, [prompt], max_new_tokens=3, stop_tokens=[])
    list(sampler.stream(model, prompt, max_new_tokens=3, stop_tokens=[]))
    assert calls == {("prefill", "KVCache"), ("decode", "KVCache")}
    engine(model).generate([request(0, prompt, 6)])
    assert calls == {(p, c) for p in ("prefill", "decode") for c in ("KVCache", "PagedKVCache")}

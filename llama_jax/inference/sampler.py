"""Generation: a jitted prefill, a jitted `lax.while_loop` decode over a donated KV cache, sampling.

    generate(model, prompts, max_new_tokens=...)   one call, one result per prompt
    stream(model, prompt, max_new_tokens=...)      yields token ids as they are produced

How a batch of ragged prompts runs (Meta's `generation.py` does the same work in a Python loop):

1. Prompts are right-padded into a `[B, P]` buffer; B, P and the output length N are rounded up to
   powers of two so a stream of differently sized requests compiles a bounded number of programs.
   The cache holds S = P + N positions (entry s = position s), so rows need no offsets.
2. Prefill runs the buffer through the model in chunks of `model.options.prefill_chunk` tokens (a scan
   inside the one jitted prefill; chunks past every prompt skipped), filling the cache, and projects onto the
   vocabulary only each row's last prompt token (`[B, V]`, never `[B, P, V]`), from which the
   first new token is sampled. Pad tokens write garbage entries at positions a row has not reached
   yet; each is overwritten before any query can see it.
3. The decode loop feeds each row's last token at its own position, samples, records the token and
   its logprob, and marks the row done on a stop token. Done rows stop counting and stop moving;
   the loop exits when every row is done or `max_new_tokens` were produced. Nothing per token
   returns to the host.

The model is used functionally: `nnx.split` once per call, and the jitted functions are pure in the
parameter state (`nnx.merge` inside the trace), so there is no `nnx.jit` bookkeeping per call.
The jitted programs (the engine's too) and the per-layer weights the decode step reads are in
`llama_jax/inference/decoding.py`; the request check, stop tokens, results and host transfer in
`llama_jax/inference/generation.py`.

What to sample is a `SamplingParams` (`llama_jax/inference/sampling.py`, with the filters and Meta's rules):
`generate(model, prompts, params)`, or its fields as keywords. Each prompt row has its own PRNG
stream, `fold_in(key(seed), row)` (`decoding.token_keys`), so a prompt's sample does not depend on
what it was batched with; with one seed per prompt (`seed=[s0, s1, ...]`) row i's stream is
`fold_in(key(s_i), 0)`, the stream of that prompt generated alone with `seed=s_i`, so it does not
depend on its row either (the batch job and the engine rely on this).

`logprobs=True` records each new token's log-prob, `top_logprobs=K` the K most likely ids and theirs
(on device, `lax.top_k`, for distillation data), `prompt_logprobs=True` each prompt token's (the
prefill then projects every prompt position onto the vocabulary, `decoding.score`); all under the
model's own distribution, or the processed one with `logprobs_mode="processed"`. `max_new_tokens=0`
samples nothing: with `prompt_logprobs`, that scores a given text (`score`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from llama_jax.inference import constrain, decoding
from llama_jax.inference.decoding import DecodeState, Prompt, Rows, Weights, trace_counts
from llama_jax.inference.generation import (
    LLAMA3_STOP_TOKENS,
    MAX_STOP_TOKENS,
    GenerationResult,
    check_can_generate,
    check_prompt,
    default_stop_tokens,
    result,
    stop_ids,
    to_host,
)
from llama_jax.inference.sampling import SamplingParams
from llama_jax.model import platform
from llama_jax.model.kv_cache import KVCache
from llama_jax.weights import placement

__all__ = [
    "LLAMA3_STOP_TOKENS",
    "MAX_STOP_TOKENS",
    "GenerationResult",
    "Inputs",
    "SamplingParams",
    "default_stop_tokens",
    "generate",
    "inputs",
    "lower",
    "prompt_bucket",
    "sampling_params",
    "score",
    "stop_ids",
    "stream",
    "trace_counts",
]

# Smallest buckets: a prompt buffer and an output buffer never shrink below these.
MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16


# ---- host side: validation, bucketing ------------------------------------------------------------------


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def prompt_bucket(length: int, max_seq_len: int) -> int:
    """The prompt buffer `generate` pads a batch to when its longest prompt has `length` tokens:
    batching prompts of one bucket together keeps each prompt's program what it is alone."""
    return min(_bucket(length, MIN_PROMPT_BUCKET), max_seq_len)


def _check_prompts(prompts, vocab_size: int, max_seq_len: int, max_new_tokens: int) -> list[np.ndarray]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not len(prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists, e.g. [[128000, 9906]]")
    if isinstance(prompts[0], (int, np.integer)):
        raise ValueError("prompts must be a list of token-id lists; wrap a single prompt: [tokens]")
    return [check_prompt(p, f"prompt {i}", vocab_size, max_seq_len, max_new_tokens) for i, p in enumerate(prompts)]


def sampling_params(params: SamplingParams | None = None, **fields) -> SamplingParams:
    """`params` with `fields` replaced, or `SamplingParams(**fields)`: what `generate`'s arguments mean."""
    if params is None:
        return SamplingParams(**fields)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"expected a SamplingParams, got {type(params).__name__}")
    return dataclasses.replace(params, **fields) if fields else params


@dataclasses.dataclass(frozen=True)
class Inputs:
    """A checked, bucketed request as the programs take it:
    `decoding.decode(weights, decoding.prefill(weights, state, prompt), until)`."""

    weights: Weights
    state: DecodeState  # before the first token; its cache abstract with `inputs(..., abstract=True)`
    prompt: Prompt
    until: np.ndarray  # [] int32: max_new_tokens
    n_prompts: int
    # Constrained requests: the rows' grammar states (None for idle rows) and their tokenizer's grammars.
    matchers: tuple[constrain.Matcher | None, ...] | None = None
    grammars: constrain.Grammars | None = None


def _empty_cache(model, batch: int, length: int, by_layer: bool) -> KVCache:
    """A zero cache created in place: on a mesh, each device allocates only its own shard (zeros made
    on one device and then `device_put` would need the whole cache on it first); `by_layer`: one buffer
    per layer (`decoding.by_layer`)."""
    spec = getattr(model, "sharding", None)
    sharding = None if spec is None else placement.cache_sharding(model.config, batch, length, spec)
    return KVCache.zeros(model.config, batch, length, dtype=model.dtype, sharding=sharding, by_layer=by_layer)


def inputs(
    model,
    prompts,
    params: SamplingParams,
    *,
    min_batch: int = 1,
    unroll=None,
    abstract: bool = False,
    tokenizer=None,
) -> Inputs:
    """What `generate` runs for these arguments (`abstract`: the cache as `ShapeDtypeStruct`s, nothing
    allocated). The request is checked here, before any device work; a constrained one (`json_schema`,
    `regex`, `choice`) is compiled against `tokenizer`'s vocabulary."""
    config = model.config
    check_can_generate(model)
    params.check_vocab(config.vocab_size)
    if not (isinstance(min_batch, (int, np.integer)) and not isinstance(min_batch, bool) and min_batch >= 1):
        raise ValueError(f"min_batch must be an integer >= 1, got {min_batch!r}")
    rows = _check_prompts(prompts, config.vocab_size, config.max_seq_len, params.max_new_tokens)
    seed = params.seed
    per_row_seeds = isinstance(seed, tuple)
    if per_row_seeds and len(seed) != len(rows):
        raise ValueError(f"seed: got {len(seed)} seeds for {len(rows)} prompts; expected one per prompt")
    stops = stop_ids(model, params.stop_tokens)
    b = _bucket(max(len(rows), min_batch), 1)
    p = prompt_bucket(max(len(r) for r in rows), config.max_seq_len)
    n_out = _bucket(params.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    # Entry s holds position s; positions reach at most longest + max_new_tokens - 1 < P + N.
    cache_len = min(p + n_out, config.max_seq_len)
    tokens_bp = np.zeros((b, p), np.int32)
    lengths_b = np.ones((b,), np.int32)
    targets_bp = np.full((b, p), -1, np.int32)  # position j scores prompt token j + 1
    for i, r in enumerate(rows):
        tokens_bp[i, : len(r)] = r
        lengths_b[i] = len(r)
        targets_bp[i, : len(r) - 1] = r[1:]
    if per_row_seeds:  # a prompt's stream is the one it has alone (stream 0), wherever it sits
        seeds_b = np.zeros((b,), np.uint32)
        seeds_b[: len(rows)] = seed
        streams_b = np.zeros((b,), np.int32)
    else:
        seeds_b = np.full((b,), seed, np.uint32)
        streams_b = np.arange(b, dtype=np.int32)

    weights = Weights.of(model, unroll)

    def make_cache():
        return _empty_cache(model, b, cache_len, decoding.by_layer(weights))

    matchers = grammars = None
    if params.constraint is not None:
        if tokenizer is None:
            raise ValueError(f"{params.constraint[0]}: constrained generation needs the tokenizer (tokenizer=...)")
        grammars = constrain.Grammars.of(tokenizer, config.vocab_size)
        matchers = tuple(grammars.matcher(params, stops) for _ in rows) + (None,) * (b - len(rows))
    cache = jax.eval_shape(make_cache) if abstract else make_cache()
    state = DecodeState.start(
        cache,
        Rows(seeds_b, streams_b, params.knobs(), stops[None, :]),
        last=np.zeros(b),
        positions=lengths_b - 1,
        count=np.zeros(b),
        limit=np.full(b, params.max_new_tokens),
        live=(np.arange(b) < len(rows)) & (params.max_new_tokens > 0),
        n_out=n_out,
        mode=params.mode,
        mask=None if matchers is None else grammars.masks(matchers),
    )
    prompt = Prompt(tokens_bp, lengths_b - 1, targets=targets_bp if params.prompt_logprobs else None)
    until = np.int32(params.max_new_tokens)
    return Inputs(weights, state, prompt, until, len(rows), matchers, grammars)


def _decode(job: Inputs, state: DecodeState, until) -> DecodeState:
    """`decoding.decode` up to output slot `until`; a constrained job one step at a time, each under the
    mask of the tokens its rows drew so far (`constrain.decode_steps`)."""
    if job.matchers is None:
        return decoding.decode(job.weights, state, until)
    forward = functools.partial(decoding.forward, job.weights)
    return constrain.decode_steps(forward, decoding.pick, state, job.matchers, job.grammars.masks, until)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    min_batch: int = 1,
    unroll: int | bool | None = None,
    tokenizer=None,
    **sampling,
) -> list[GenerationResult]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens`.

    Args:
      model: a `Llama` (from `llama_jax.load` or `default_model`).
      prompts: token-id lists, BOS included if wanted (`Tokenizer.encode(text, bos=True, eos=False)`).
      params: a `SamplingParams` (max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_tokens,
        logprobs, top_logprobs; see `llama_jax.inference.sampling`).
      **sampling: the same fields as keywords, e.g. `generate(model, prompts, max_new_tokens=64)`;
        with `params` they replace its fields.
      min_batch: pad the batch with idle rows to at least this many (then to a power of two), so a
        job's last, partial batches reuse its full batches' program and still span a data-parallel mesh.
      unroll: None (default): the decode step reads each layer's own arrays in place
        (`decoding.layer_weights`, a second copy of the layer weights, kept with the model) where that
        copy takes at most `unstacked.COPY_BUDGET` of each device's memory, else it scans the stacked
        weights (a model held `Unstacked` runs its own buffers). An int: it scans the stacked weights with
        that unrolling, with no second copy (on a GPU that scan copies each layer out: docs/GPU.md).
      tokenizer: the model's `Tokenizer`, which a constrained request (`json_schema`, `regex`, `choice`)
        needs: its outputs keep to the constraint token by token (`llama_jax.inference.constrain`).

    Returns:
      One `GenerationResult` per prompt, in order.
    """
    params = sampling_params(params, **sampling)
    job, state = _run(model, prompts, params, min_batch=min_batch, unroll=unroll, tokenizer=tokenizer)
    out, count, stopped, scores = to_host((state.out, state.count, state.stopped, state.prompt_logprobs))
    lengths = job.prompt.last + 1
    return [
        result(out.row(i, count[i]), stopped[i], state.mode, None if scores is None else scores[i, : lengths[i] - 1])
        for i in range(job.n_prompts)
    ]


def score(
    model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]] | None = None, **sampling
) -> list[tuple[float, ...]]:
    """The log-prob of each given token under the model, nothing sampled: for each prompt, the float32
    log-prob of each of its tokens after the first given the ones before it; with `completions`, of each
    completion token given its prompt and the completion tokens before it (scoring a given answer).

    The `prompt_logprobs` of `generate(model, prompts + completions, max_new_tokens=0,
    prompt_logprobs=True)`; `**sampling` as in `generate` (`logprobs_mode="processed"` with a
    temperature and filters scores under the distribution sampling would draw from).
    """
    params = sampling_params(None, **{"max_new_tokens": 0, **sampling, "prompt_logprobs": True})
    if completions is None:
        return [r.prompt_logprobs[1:] for r in generate(model, prompts, params)]
    if isinstance(completions, (str, bytes)) or len(completions) != len(prompts):
        raise ValueError(f"score: expected one completion (a token-id list) per prompt, {len(prompts)} in all")
    joined = [[*p, *c] for p, c in zip(prompts, completions, strict=True)]
    return [r.prompt_logprobs[len(p) :] for p, r in zip(prompts, generate(model, joined, params), strict=True)]


def _run(
    model, prompts, params: SamplingParams, *, min_batch=1, unroll=None, tokenizer=None
) -> tuple[Inputs, DecodeState]:
    """`generate` up to the final device state (which tests inspect)."""
    job = inputs(model, prompts, params, min_batch=min_batch, unroll=unroll, tokenizer=tokenizer)
    state = decoding.prefill(job.weights, job.state, job.prompt)
    if not params.max_new_tokens:  # scoring only: no row is live, no decode program to compile
        return job, state
    return job, _decode(job, state, job.until)


def lower(
    model,
    prompts,
    params: SamplingParams | None = None,
    *,
    platforms: Sequence[str] | None = None,
    unroll=None,
    **sampling,
) -> tuple[jax.stages.Lowered, ...]:
    """The (prefill, decode) programs `generate` runs for these arguments, lowered but neither compiled
    nor run; `platforms` ("cuda", "tpu", ...) lowers them for machines other than this one.

    Inputs are abstract where `generate` would compute them (the cache, the decode state), so
    nothing executes; the per-layer weights of the decode step are made as `generate` makes them.
    Traced under `platform.lowering_for(platforms[0])`, so attention "auto" picks that platform's backend.
    """
    with platform.lowering_for(platforms[0] if platforms else None):  # what attention "auto" selects for
        job = inputs(model, prompts, sampling_params(params, **sampling), unroll=unroll, abstract=True)
        prefill = decoding.prefill.trace(job.weights, job.state, job.prompt)
        state = jax.eval_shape(decoding.prefill, job.weights, job.state, job.prompt)
        decode = decoding.decode.trace(job.weights, state, job.until)
    return prefill.lower(lowering_platforms=platforms), decode.lower(lowering_platforms=platforms)


def stream(
    model,
    prompt_tokens: Sequence[int],
    params: SamplingParams | None = None,
    *,
    chunk: int = 1,
    unroll: int | bool | None = None,
    tokenizer=None,
    **sampling,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (stop token excluded).

    `params` / `**sampling` / `tokenizer` as in `generate` (one seed). The same prefill and decode programs as
    `generate` (same bucketing, same tokens for the same seed), run `chunk` steps per call so the host
    sees tokens as they come. The request is checked here, before the first token is asked for. The
    generator's return value (`StopIteration.value`, or the value of `yield from`) is the
    `GenerationResult`, with the log-probs asked for (`logprobs`, `top_logprobs`, `prompt_logprobs`).
    """
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    params = sampling_params(params, **sampling)
    if isinstance(params.seed, tuple):
        raise ValueError(f"stream: one prompt, one seed; got seed={params.seed!r}")
    job = inputs(model, [prompt_tokens], params, unroll=unroll, tokenizer=tokenizer)
    return _stream(job, params.max_new_tokens, chunk)


def _stream(job: Inputs, max_new_tokens: int, chunk: int) -> Iterator[int]:
    state = decoding.prefill(job.weights, job.state, job.prompt)
    emitted = 0
    while True:
        state = _decode(job, state, np.int32(min(emitted + chunk, max_new_tokens)))
        out, count, stopped = to_host((state.out, state.count[0], state.stopped[0]))
        n = int(count) - bool(stopped)
        yield from (int(t) for t in out.tokens[0, emitted:n])
        emitted = n
        if stopped or emitted >= max_new_tokens:
            scores = None if state.prompt_logprobs is None else to_host(state.prompt_logprobs[0, : job.prompt.last[0]])
            return result(out.row(0, count), stopped, state.mode, scores)

"""Generation: a jitted prefill, a jitted `lax.while_loop` decode over a donated KV cache, sampling.

    generate(model, prompts, max_new_tokens=...)   one call, one result per prompt
    stream(model, prompt, max_new_tokens=...)      yields token ids as they are produced

How a batch of ragged prompts runs (Meta's `generation.py` does the same work in a Python loop):

1. Prompts are right-padded into a `[B, P]` buffer; B, P and the output length N are rounded up to
   powers of two so a stream of differently sized requests compiles a bounded number of programs.
   The cache holds S = P + N positions (entry s = position s), so rows need no offsets.
2. Prefill runs the buffer through the model in chunks of `model.prefill_chunk` tokens (a scan
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
The jitted programs and the per-layer weights the decode step reads are in `llama_jax/decoding.py`.

What to sample is a `SamplingParams` (`llama_jax/sampling.py`, with the filters and Meta's rules):
`generate(model, prompts, params)`, or its fields as keywords. Each prompt row has its own PRNG
stream, `fold_in(key(seed), row)`, so a prompt's sample does not depend on what it was batched with;
with one seed per prompt (`seed=[s0, s1, ...]`) row i's stream is `fold_in(key(s_i), 0)`, the stream
of that prompt generated alone with `seed=s_i`, so it does not depend on its row either (the batch
job relies on this).

`top_logprobs=K` also records, at every step, the K most likely ids and their log-softmax under the
untempered logits (on device, `lax.top_k`), for distillation data.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from llama_jax import decoding, placement, platform
from llama_jax.config import LLAMA3_VOCAB_SIZE
from llama_jax.decoding import trace_counts
from llama_jax.kv_cache import KVCache
from llama_jax.sampling import Mode, SamplingParams

__all__ = [
    "LLAMA3_STOP_TOKENS",
    "GenerationResult",
    "SamplingParams",
    "default_stop_tokens",
    "generate",
    "lower",
    "prompt_bucket",
    "sampling_params",
    "stream",
    "trace_counts",
]

# <|end_of_text|>, <|eom_id|>, <|eot_id|> (llama-models `llama3/generation.py`, its stop tokens).
LLAMA3_STOP_TOKENS = (128_001, 128_008, 128_009)

# Smallest buckets: a prompt buffer and an output buffer never shrink below these.
MIN_PROMPT_BUCKET = 16
MIN_NEW_TOKENS_BUCKET = 16
# Stop ids are passed as a fixed-size array (padded with -1) so a new stop set is not a new program.
MAX_STOP_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one prompt produced.

    tokens: the new tokens, the stop token excluded.
    stop_reason: "stop" (a stop token was sampled) or "length" (`max_new_tokens` reached).
    stop_token: the stop token sampled (eot vs eom matters to chat), None for "length".
    logprobs: float32 log-softmax of the untempered logits at each token of `tokens`, when asked.
    top_logprobs: with `top_logprobs=K`, `(ids, logprobs)`: for each token of `tokens` and for the
      stop token when stop_reason == "stop", the K most likely ids (most likely first) and their
      float32 log-softmax under the untempered logits, i.e. the distribution that token was drawn from.
    """

    tokens: tuple[int, ...]
    stop_reason: str
    stop_token: int | None = None
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]] | None = None


# ---- host side: validation, bucketing, results -------------------------------------------------------


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
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1:
            raise ValueError(f"prompt {i}: expected a flat list of token ids, got shape {ids.shape}")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty; expected at least one token (e.g. the BOS id 128000)")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i}: expected integer token ids, got dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if bad.size:
            j = int(bad[0])
            raise ValueError(
                f"prompt {i}: token id {int(ids[j])} at position {j} is outside the vocabulary [0, {vocab_size})"
            )
        if ids.size + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt {i} has {ids.size} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{ids.size + max_new_tokens} positions, beyond the model's context of {max_seq_len} "
                f"(config.max_seq_len): shorten the prompt or lower max_new_tokens"
            )
        checked.append(ids.astype(np.int32))
    return checked


def default_stop_tokens(model) -> tuple[int, ...]:
    """What `stop_tokens=None` means: the attached tokenizer's (`model.tokenizer.stop_tokens`), else
    Llama 3's (<|end_of_text|>, <|eom_id|>, <|eot_id|>) for a Llama 3 vocabulary, else none."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tuple(tokenizer.stop_tokens)
    return LLAMA3_STOP_TOKENS if model.config.vocab_size == LLAMA3_VOCAB_SIZE else ()


def stop_ids(model, stop_tokens) -> np.ndarray:
    """The stop tokens `stop_tokens` means (None: `default_stop_tokens`), checked against the vocabulary,
    sorted and padded with -1 to `MAX_STOP_TOKENS`: the int32 array the programs compare tokens with."""
    vocab = model.config.vocab_size
    if stop_tokens is None:
        stop_tokens = default_stop_tokens(model)
    stop_tokens = sorted({int(t) for t in stop_tokens})
    if len(stop_tokens) > MAX_STOP_TOKENS:
        raise ValueError(f"stop_tokens: at most {MAX_STOP_TOKENS} are supported, got {len(stop_tokens)}")
    for t in stop_tokens:
        if not 0 <= t < vocab:
            raise ValueError(f"stop_tokens: token {t} is outside the vocabulary [0, {vocab})")
    return np.asarray(stop_tokens + [-1] * (MAX_STOP_TOKENS - len(stop_tokens)), np.int32)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A validated, bucketed request ready to run."""

    n_prompts: int
    prompt_bp: np.ndarray
    lengths_b: np.ndarray
    active_b: np.ndarray
    cache_len: int
    n_out: int
    stop_ids: np.ndarray
    knobs: np.ndarray
    mode: Mode
    seeds_b: np.ndarray  # [B] uint32: row i's stream is fold_in(key(seeds_b[i]), streams_b[i])
    streams_b: np.ndarray  # [B] int32


def sampling_params(params: SamplingParams | None = None, **fields) -> SamplingParams:
    """`params` with `fields` replaced, or `SamplingParams(**fields)`: what `generate`'s arguments mean."""
    if params is None:
        return SamplingParams(**fields)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"expected a SamplingParams, got {type(params).__name__}")
    return dataclasses.replace(params, **fields) if fields else params


def _prepare(model, prompts, params: SamplingParams, min_batch: int = 1) -> _Job:
    config = model.config
    if getattr(model, "score", None) is not None:
        raise ValueError(
            f"this model has a sequence-classification head (score [D, {model.score.shape[1]}]) instead of an LM "
            "head: it scores sequences (llama_jax.rejection.reward_scorer) and cannot generate"
        )
    params.check_vocab(config.vocab_size)
    if not (isinstance(min_batch, (int, np.integer)) and not isinstance(min_batch, bool) and min_batch >= 1):
        raise ValueError(f"min_batch must be an integer >= 1, got {min_batch!r}")
    rows = _check_prompts(prompts, config.vocab_size, config.max_seq_len, params.max_new_tokens)
    seed = params.seed
    per_row_seeds = isinstance(seed, tuple)
    if per_row_seeds and len(seed) != len(rows):
        raise ValueError(f"seed: got {len(seed)} seeds for {len(rows)} prompts; expected one per prompt")
    longest = max(len(r) for r in rows)
    b = _bucket(max(len(rows), min_batch), 1)
    p = prompt_bucket(longest, config.max_seq_len)
    n_out = _bucket(params.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    # Entry s holds position s; positions reach at most longest + max_new_tokens - 1 < P + N.
    cache_len = min(p + n_out, config.max_seq_len)
    prompt_bp = np.zeros((b, p), np.int32)
    lengths_b = np.ones((b,), np.int32)
    for i, r in enumerate(rows):
        prompt_bp[i, : len(r)] = r
        lengths_b[i] = len(r)
    if per_row_seeds:  # a prompt's stream is the one it has alone (row 0), wherever it sits
        seeds_b = np.zeros((b,), np.uint32)
        seeds_b[: len(rows)] = seed
        streams_b = np.zeros((b,), np.int32)
    else:
        seeds_b = np.full((b,), seed, np.uint32)
        streams_b = np.arange(b, dtype=np.int32)
    return _Job(
        n_prompts=len(rows),
        prompt_bp=prompt_bp,
        lengths_b=lengths_b,
        active_b=np.arange(b) < len(rows),
        cache_len=cache_len,
        n_out=n_out,
        stop_ids=stop_ids(model, params.stop_tokens),
        knobs=params.knobs(),
        mode=params.mode,
        seeds_b=seeds_b,
        streams_b=streams_b,
    )


def _empty_cache(model, batch: int, length: int) -> KVCache:
    """A zero cache created in place: on a mesh, each device allocates only its own shard (zeros made
    on one device and then `device_put` would need the whole cache on it first)."""
    spec = getattr(model, "sharding", None)
    sharding = None if spec is None else placement.cache_sharding(model.config, batch, length, spec)
    return KVCache.zeros(model.config, batch, length, dtype=model.dtype, sharding=sharding)


def _start(model, job: _Job, unroll):
    """Prefill (which samples the first token); → the decode program's weights and its first state."""
    graphdef, params = nnx.split(model)
    state = decoding.prefill(
        graphdef,
        params,
        job.prompt_bp,
        job.lengths_b,
        job.active_b,
        _empty_cache(model, job.prompt_bp.shape[0], job.cache_len),
        job.seeds_b,
        job.streams_b,
        job.knobs,
        job.stop_ids,
        n_out=job.n_out,
        mode=job.mode,
    )
    layers = decoding.layer_weights(model) if unroll is None else None
    return (graphdef, params, layers), state


def _to_host(tree):
    """Fetch results to this host. On several processes the arrays span devices this process cannot
    address, so they are all-gathered first (every process gets every row)."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _result(tokens, logprobs, count, stopped, want_logprobs, top_ids=None, top_logprobs=None) -> GenerationResult:
    count = int(count)
    top = None
    if top_ids is not None and top_ids.shape[-1]:
        n = count + bool(stopped)  # the stop token's distribution too
        top = (
            tuple(tuple(int(i) for i in row) for row in top_ids[:n]),
            tuple(tuple(float(x) for x in row) for row in top_logprobs[:n]),
        )
    return GenerationResult(
        tokens=tuple(int(t) for t in tokens[:count]),
        stop_reason="stop" if stopped else "length",
        stop_token=int(tokens[count]) if stopped else None,
        logprobs=tuple(float(x) for x in logprobs[:count]) if want_logprobs else None,
        top_logprobs=top,
    )


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    min_batch: int = 1,
    unroll: int | bool | None = None,
    **sampling,
) -> list[GenerationResult]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens`.

    Args:
      model: a `Llama` (from `llama_jax.load` or `default_model`).
      prompts: token-id lists, BOS included if wanted (`Tokenizer.encode(text, bos=True, eos=False)`).
      params: a `SamplingParams` (max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_tokens,
        logprobs, top_logprobs; see `llama_jax.sampling`).
      **sampling: the same fields as keywords, e.g. `generate(model, prompts, max_new_tokens=64)`;
        with `params` they replace its fields.
      min_batch: pad the batch with idle rows to at least this many (then to a power of two), so a
        job's last, partial batches reuse its full batches' program and still span a data-parallel mesh.
      unroll: None (default): the decode step reads each layer's own arrays in place
        (`decoding.layer_weights`, a second copy of the layer weights, kept with the model) where that
        copy takes at most `decoding.LAYER_COPY_BUDGET` of each device's memory, else it scans the
        stacked weights. An int: it scans the stacked weights with that unrolling, with no second copy.

    Returns:
      One `GenerationResult` per prompt, in order.
    """
    params = sampling_params(params, **sampling)
    job, state = _run(model, prompts, params, min_batch=min_batch, unroll=unroll)
    tokens, lps, counts, stopped, top_ids, top_lps = _to_host(
        (state.tokens, state.logprobs, state.counts, state.stopped, state.top_ids, state.top_logprobs)
    )
    return [
        _result(tokens[i], lps[i], counts[i], stopped[i], params.logprobs, top_ids[i], top_lps[i])
        for i in range(job.n_prompts)
    ]


def _run(model, prompts, params: SamplingParams, *, min_batch=1, unroll=None) -> tuple[_Job, decoding.DecodeState]:
    """`generate` up to the final device state (which tests inspect)."""
    unroll = decoding.decode_unroll(model, unroll)
    job = _prepare(model, prompts, params, min_batch)
    weights, state = _start(model, job, unroll)
    limit = np.int32(params.max_new_tokens)
    state = decoding.decode(*weights, state, limit, job.knobs, job.stop_ids, mode=job.mode, unroll=unroll)
    return job, state


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
    params = sampling_params(params, **sampling)
    job = _prepare(model, prompts, params)
    unroll = decoding.decode_unroll(model, unroll)
    graphdef, params_state = nnx.split(model)
    cache = jax.eval_shape(lambda: _empty_cache(model, job.prompt_bp.shape[0], job.cache_len))
    prefill_args = (
        graphdef,
        params_state,
        job.prompt_bp,
        job.lengths_b,
        job.active_b,
        cache,
        job.seeds_b,
        job.streams_b,
        job.knobs,
        job.stop_ids,
    )
    layers = decoding.layer_weights(model) if unroll is None else None
    limit = np.int32(params.max_new_tokens)
    with platform.lowering_for(platforms[0] if platforms else None):  # what attention "auto" selects for
        prefill = decoding.prefill.trace(*prefill_args, n_out=job.n_out, mode=job.mode)
        state = jax.eval_shape(functools.partial(decoding.prefill, n_out=job.n_out, mode=job.mode), *prefill_args)
        decode = decoding.decode.trace(
            graphdef, params_state, layers, state, limit, job.knobs, job.stop_ids, mode=job.mode, unroll=unroll
        )
    return prefill.lower(lowering_platforms=platforms), decode.lower(lowering_platforms=platforms)


def stream(
    model,
    prompt_tokens: Sequence[int],
    params: SamplingParams | None = None,
    *,
    chunk: int = 1,
    unroll: int | bool | None = None,
    **sampling,
) -> Iterator[int]:
    """Yield the new tokens of one prompt as they are produced (stop token excluded).

    `params` / `**sampling` as in `generate` (one seed; logprobs are not streamed). The same prefill
    and decode programs as `generate` (same bucketing, same tokens for the same seed), run `chunk`
    steps per call so the host sees tokens as they come. The request is checked here, before the
    first token is asked for. The generator's return value (`StopIteration.value`, or the value of
    `yield from`) is the `GenerationResult`.
    """
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    params = sampling_params(params, **sampling)
    if params.logprobs or params.top_logprobs or isinstance(params.seed, tuple):
        raise ValueError("stream: logprobs, top_logprobs and per-prompt seeds are for generate; got " + repr(params))
    job = _prepare(model, [prompt_tokens], params)
    return _stream(model, job, params.max_new_tokens, chunk, decoding.decode_unroll(model, unroll))


def _stream(model, job: _Job, max_new_tokens, chunk, unroll) -> Iterator[int]:
    weights, state = _start(model, job, unroll)
    emitted = 0
    while True:
        limit = min(emitted + chunk, max_new_tokens)
        state = decoding.decode(*weights, state, np.int32(limit), job.knobs, job.stop_ids, mode=job.mode, unroll=unroll)
        tokens, count, stopped = _to_host((state.tokens[0], state.counts[0], state.stopped[0]))
        yield from (int(t) for t in tokens[emitted:count])
        emitted = int(count)
        if stopped or emitted >= max_new_tokens:
            return _result(tokens, np.zeros(0), count, stopped, False)

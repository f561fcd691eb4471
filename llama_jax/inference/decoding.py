"""The jitted generation programs, one pair for every caller, and the weights their decode steps read.

    prefill(weights, state, prompt) -> DecodeState   a prompt (or a chunk of one) into the cache, and the
                                                      next token of each row whose prompt ends there (with
                                                      `Prompt.targets`: each prompt token's log-prob too)
    decode(weights, state, until) -> DecodeState     a `lax.while_loop` of decode steps until output slot
                                                      `until` or every row is done
    forward(weights, state) -> (DecodeState, logits)  one decode step in two programs, for constrained
    pick(state, logits, mask) -> DecodeState          rows: the host fills the step's masks meanwhile

`generate` and `stream` (`llama_jax.inference.sampler`: a contiguous `KVCache`, one state for the whole request)
and the engine (`llama_jax.inference.engine`: a `PagedKVCache` over a page pool, a fresh state per prefill chunk
and per decode burst) run these two programs; the cache is any `kv_cache.Cache`. Their inputs are
registered dataclasses: `Weights` (the split model, the per-layer decode weights), `DecodeState` (the
cache, each row's sampling inputs `Rows`, its position and counts, the `generation.Outputs` recorded
so far) and `Prompt`. Both are pure in the parameter state (`nnx.merge` inside the trace) and donate
the state (the cache with it). Nothing per token returns to the host: the loop records tokens,
logprobs and top-K alternatives on device. Every token is picked by one function (`_pick`:
`sampling.sample_rows`, stop ids, logprobs, top-K) with the key of one rule (`token_keys`).

To lower a program without running it: `prefill.trace(weights, state, prompt)` and
`decode.trace(weights, state, until)`, with `generate`'s inputs from `sampler.inputs(..., abstract=True)`
and the engine's from `DecodeState.start` over a `PagedKVCache` (`Engine._state`); the state after
prefill is `jax.eval_shape(prefill, weights, state, prompt)`.

The decode step runs the layers one by one from `layer_weights(model)`: each layer's weights as
arrays of their own, cut from the stacked `[L, ...]` buffers once per model and kept with it. From
the stacked buffers, XLA copies every layer's weights out of them on every step, inside the loop
(scanned or unrolled alike; `tests/test_decode_program.py` reads the compiled loop to keep it so).
The price: the layer weights are held twice, and the decode program's compile time grows with depth.
Where that copy would not fit (`unstacked.COPY_BUDGET` of a device) `Weights.of` scans the stack (TPU,
CPU: a TPU scan reads its slices in place); a GPU model that large holds its layers `Unstacked` from
the start (`llama_jax.model.unstacked`), and every program runs them from those buffers.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.inference.constrain import apply_mask
from llama_jax.inference.generation import Outputs
from llama_jax.inference.sampling import Mode, processed_logits, sample_rows
from llama_jax.model import unstacked
from llama_jax.model.kv_cache import Cache
from llama_jax.model.model import BlockWeights
from llama_jax.model.platform import target as target_platform

# One `BlockWeights` per layer: the decode step's own copy of the layers (`layer_weights`).
LayerWeights = tuple[BlockWeights, ...]

__all__ = [
    "DecodeState",
    "Prompt",
    "Rows",
    "Weights",
    "by_layer",
    "decode",
    "forward",
    "layer_weights",
    "pick",
    "prefill",
    "score_prompt",
    "token_keys",
    "trace_counts",
    "unstack",
]

_TRACES = {"prefill": 0, "decode": 0, "forward": 0, "pick": 0}


def trace_counts() -> dict[str, int]:
    """How many times each jitted program was traced (= compiled) in this process."""
    return dict(_TRACES)


def _static(**kwargs):
    return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """What the programs compute with: the model split (`nnx.split`) and the decode step's layers."""

    params: nnx.State
    layers: LayerWeights | None  # per-layer weights read in place, or None: scan the stacked ones
    graphdef: nnx.GraphDef = _static()
    unroll: int | bool = _static(default=1)  # the scan's unroll factor, where it scans the stacked weights

    @classmethod
    def of(cls, model, unroll: int | bool | None = None) -> Weights:
        """The model's weights for generation. A model holding its layers `unstacked` runs them from its
        own buffers. Else, `unroll` not given: per-layer weights where their copy fits (`layer_copies_fit`),
        else the stacked ones under a rolled scan; given: the stacked ones scanned with that unroll factor,
        and no copy (on a GPU that scan copies each layer's weights every step: docs/GPU.md)."""
        graphdef, params = nnx.split(model)
        if unstacked.held(params):
            return cls(params, None, graphdef)
        if unroll is None and layer_copies_fit(model):
            return cls(params, layer_weights(model), graphdef)
        return cls(params, None, graphdef, 1 if unroll is None else unroll)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """How each of B rows samples: token i of a row is drawn with `token_keys(seeds, streams, i)`."""

    seeds: jax.Array  # [B] uint32
    streams: jax.Array  # [B] int32
    knobs: jax.Array  # [3] or [B, 3] float32: temperature, top_p, min_p (`SamplingParams.knobs`)
    stops: jax.Array  # [1 or B, MAX_STOP_TOKENS] int32, -1 padded


def token_keys(seeds_b, streams_b, index_b):
    """The PRNG key of token `index_b[b]` of row b: fold_in(fold_in(key(seed), stream), index). A request
    generated alone (stream 0) draws token i with the same key wherever and with whatever it runs."""
    return jax.vmap(lambda s, r, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), i))(
        seeds_b, streams_b, index_b
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The programs' state: B rows (idle rows included), N output slots."""

    cache: Cache
    rows: Rows
    last: jax.Array  # [B] int32: the token to feed next
    positions: jax.Array  # [B] int32: its position (= the cache entry it writes)
    count: jax.Array  # [B] int32: tokens the row sampled (its next token's index), stop token included
    limit: jax.Array  # [B] int32: the row's max_new_tokens
    live: jax.Array  # [B] bool: still sampling (not stopped, under its limit, not idle)
    stopped: jax.Array  # [B] bool: ended by a stop token
    step: jax.Array  # [] int32: the output slot the next token goes to
    out: Outputs  # [B, N, ...]
    mode: Mode = _static()
    # [B, T] float32: the prompt scores of the last prefill (`Prompt.targets`), None when it was not asked
    prompt_logprobs: jax.Array | None = None
    # [B, W] int32 packed bitmask of the tokens each row may draw next (`constrain`), or None: any. A
    # mask holds for one token, so a state with one runs one decode step per call.
    mask: jax.Array | None = None

    @classmethod
    def start(cls, cache: Cache, rows: Rows, *, last, positions, count, limit, live, n_out: int, mode: Mode, mask=None):
        """A state before its first token (host arrays, moved by the program call): output slot 0 of N."""
        return cls(
            cache=cache,
            rows=rows,
            last=np.asarray(last, np.int32),
            positions=np.asarray(positions, np.int32),
            count=np.asarray(count, np.int32),
            limit=np.asarray(limit, np.int32),
            live=np.asarray(live, bool),
            stopped=np.zeros(len(live), bool),
            step=np.int32(0),
            out=Outputs.empty(len(live), n_out, mode),
            mode=mode,
            mask=mask,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prompt:
    """Prompt tokens for `prefill`: `[B, T]`, right-padded."""

    tokens: jax.Array  # [B, T] int32
    last: jax.Array  # [B] int32: index into T of each row's last prompt token (its logits pick the next token)
    # [B] int32: the position of tokens[:, 0]; None: every row starts at 0 in an empty cache, run as the
    # model's chunked prefill (`Llama.prefill`)
    start: jax.Array | None = None
    # [B, T] int32: the token each position is scored on (the next prompt token; -1: none), or None: no
    # prompt log-probs, and the prefill projects only the last positions onto the vocabulary
    targets: jax.Array | None = None


def _log_probs(logits_bv, knobs, mode: Mode):
    """The log-probs a request asks for: log_softmax of the raw logits, or of the processed ones
    (`sampling.processed_logits`, when `mode.processed`)."""
    return jax.nn.log_softmax(processed_logits(logits_bv, knobs, mode) if mode.processed else logits_bv, axis=-1)


def _pick(keys_b, logits_bv, knobs, stops_bs, mode: Mode, mask_bw=None):
    """Each row's token drawn with its key (`sampling.sample_rows`) among the tokens its `mask_bw` allows
    (`constrain.apply_mask`), whether it is one of the row's stop ids (`stops_bs [B or 1, S]`), and its
    per-token outputs: the token's log-prob (`_log_probs`) and the top-K alternatives (zeros where the
    mode does not ask for them)."""
    token_b = sample_rows(keys_b, logits_bv if mask_bw is None else apply_mask(logits_bv, mask_bw), knobs, mode)
    b, k = logits_bv.shape[0], mode.top_logprobs
    logp_b, top_bk, ids_bk = jnp.zeros((b,)), jnp.zeros((b, k)), jnp.zeros((b, k), jnp.int32)
    if mode.logprobs or k:
        logp_bv = _log_probs(logits_bv, knobs, mode)
        logp_b = jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]
        if k:
            top_bk, ids_bk = jax.lax.top_k(logp_bv, k)
    is_stop = jnp.any(token_b[:, None] == stops_bs, axis=-1)
    return token_b, is_stop, Outputs(token_b, logp_b, ids_bk.astype(jnp.int32), top_bk)


def advance(s: DecodeState, logits_bv, cache: Cache) -> DecodeState:
    """Sample each live row's next token from `logits_bv` (the logits at its current position), record it."""
    keys = token_keys(s.rows.seeds, s.rows.streams, s.count)
    token, is_stop, new = _pick(keys, logits_bv, s.rows.knobs, s.rows.stops, s.mode, s.mask)
    live = s.live
    count = s.count + live.astype(jnp.int32)
    finished = live & (is_stop | (count >= s.limit))
    new = dataclasses.replace(new, tokens=jnp.where(live, token, -1))
    return dataclasses.replace(
        s,
        cache=cache,
        last=jnp.where(live, token, s.last),
        positions=jnp.where(live, s.positions + 1, s.positions),
        count=count,
        live=live & ~finished,
        stopped=s.stopped | (live & is_stop),
        step=s.step + 1,
        out=s.out.record(s.step, new),
    )


# Prompt positions projected onto the vocabulary at once when prompt log-probs are asked: `[B,
# SCORE_BLOCK, V]` logits at most, never `[B, T, V]` (a long prompt's would not fit), and one head
# program whatever the prompt or chunk length.
SCORE_BLOCK = 16


def score_prompt(model, h_btd, targets_bt, knobs, mode: Mode):
    """Each position's log-prob of its target (`Prompt.targets`; 0 where -1) → `[B, T]` float32, from the
    final-normed hidden states `h_btd`, SCORE_BLOCK positions at a time (`_log_probs` per position)."""
    b, t, _ = h_btd.shape
    pad = -t % SCORE_BLOCK
    h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
    targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)), constant_values=-1)
    knobs_rows = knobs if knobs.ndim == 1 else jnp.repeat(knobs, SCORE_BLOCK, axis=0)  # per (row, position)

    def block(start):
        h_bkd = jax.lax.dynamic_slice_in_dim(h_btd, start, SCORE_BLOCK, axis=1)
        target_bk = jax.lax.dynamic_slice_in_dim(targets_bt, start, SCORE_BLOCK, axis=1)
        logits_nv = model.head(h_bkd).reshape(b * SCORE_BLOCK, -1)
        logp_bkv = _log_probs(logits_nv, knobs_rows, mode).reshape(b, SCORE_BLOCK, -1)
        logp_bk = jnp.take_along_axis(logp_bkv, jnp.maximum(target_bk, 0)[:, :, None], axis=-1)[:, :, 0]
        return jnp.where(target_bk >= 0, logp_bk, 0.0)

    scores_nbk = jax.lax.map(block, jnp.arange(0, t + pad, SCORE_BLOCK))
    return jnp.moveaxis(scores_nbk, 0, 1).reshape(b, t + pad)[:, :t]


def by_layer(weights: Weights) -> bool:
    """Whether every program runs the layers one by one from buffers of their own, prefill too, and the
    contiguous KV cache is one buffer per layer (`KVCache.zeros(by_layer=True)`): where a layer scan would
    copy each layer's slice out (a GPU), for per-layer weights or a model held `Unstacked`."""
    return unstacked.scan_copies(target_platform()) and (weights.layers is not None or unstacked.held(weights.params))


@functools.partial(jax.jit, donate_argnames=("state",))
def prefill(weights: Weights, state: DecodeState, prompt: Prompt) -> DecodeState:
    """Run the prompt tokens into `state.cache` and sample each live row's next token from the logits at
    its `prompt.last`, into output slot `state.step`; with `prompt.targets`, score every position too
    (`score_prompt`, into `prompt_logprobs`)."""
    _TRACES["prefill"] += 1
    model = nnx.merge(weights.graphdef, weights.params)
    scoring = prompt.targets is not None
    layers = weights.layers if by_layer(weights) else None
    if prompt.start is None:  # whole prompts: the chunked prefill (only the B last positions reach the head)
        tokens, last = prompt.tokens, prompt.last + 1
        logits_bv, cache, *hidden = model.prefill(tokens, state.cache, last, hidden=scoring, layers=layers)
    else:  # a chunk of each row's prompt, after the part already in the cache
        c = prompt.tokens.shape[1]
        positions_bc = prompt.start[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
        h_bcd, cache = model.forward(
            prompt.tokens, positions_bc, state.cache, use_cache=True, logits=False, layers=layers
        )
        logits_bv = model.head(jnp.take_along_axis(h_bcd, prompt.last[:, None, None], axis=1))[:, 0]
        hidden = [h_bcd]
    if scoring:
        scores_bt = score_prompt(model, hidden[0], prompt.targets, state.rows.knobs, state.mode)
        state = dataclasses.replace(state, prompt_logprobs=scores_bt)
    return advance(state, logits_bv, cache)


def _model_step(model, weights: Weights, s: DecodeState):
    """Each row's `last` token through the model at its position → (logits `[B, V]`, the cache with it)."""
    logits_b1v, cache = model.decode(
        s.last[:, None], s.positions[:, None], s.cache, unroll=weights.unroll, layers=weights.layers
    )
    return logits_b1v[:, 0], cache


@functools.partial(jax.jit, donate_argnames=("state",))
def decode(weights: Weights, state: DecodeState, until) -> DecodeState:
    """Run decode steps until `state.step == until` or no row is live (one step with a `state.mask`)."""
    _TRACES["decode"] += 1
    model = nnx.merge(weights.graphdef, weights.params)
    if state.mask is not None:
        until = jnp.minimum(until, state.step + 1)

    def cond(s: DecodeState):
        return (s.step < until) & jnp.any(s.live)

    def body(s: DecodeState) -> DecodeState:
        return advance(s, *_model_step(model, weights, s))

    return jax.lax.while_loop(cond, body, state)


# One decode step in two programs, for steps whose masks the host fills (`constrain.decode_steps`): the
# host dispatches `forward`, fills the masks while the device runs the model, then dispatches `pick`.


@functools.partial(jax.jit, donate_argnames=("state",))
def forward(weights: Weights, state: DecodeState) -> tuple[DecodeState, jax.Array]:
    """The model half of a decode step → (the state with each row's `last` in its cache, logits `[B, V]`)."""
    _TRACES["forward"] += 1
    logits_bv, cache = _model_step(nnx.merge(weights.graphdef, weights.params), weights, state)
    return dataclasses.replace(state, cache=cache), logits_bv


@functools.partial(jax.jit, donate_argnames=("state",))
def pick(state: DecodeState, logits_bv, mask_bw) -> DecodeState:
    """The sampling half: each live row's next token from `logits_bv` under `mask_bw` (`advance`)."""
    _TRACES["pick"] += 1
    return advance(dataclasses.replace(state, mask=mask_bw), logits_bv, state.cache)


# ---- the per-layer weights of the decode step ---------------------------------------------------------

# Each layer's weights as arrays of their own, in the order the decode step runs them (`Llama.forward(layers=)`).

# Per model: its `LayerWeights` and weak references to the stacked leaves they were cut from, so new
# weights (a training step, `nnx.update`) are noticed. Weak on the model: the copy dies with it.
_LAYER_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stacked_leaves(model) -> list:
    return jax.tree.leaves([nnx.state(m) for m in (model.layers, model.dense_ffn) if m is not None])


def layer_copies_fit(model, budget: float = unstacked.COPY_BUDGET) -> bool:
    """Whether the per-layer copy of the layer weights takes at most `budget` of every device's memory."""
    per_device = unstacked.bytes_per_device(_stacked_leaves(model))
    return all(
        unstacked.copy_fits(nbytes, unstacked.device_memory_limit(d), budget) for d, nbytes in per_device.items()
    )


def layer_weights(model, fuse: bool | None = None) -> LayerWeights:
    """The model's per-layer weights for the decode step, made once per model and reused while its
    stacked layer weights are the same arrays (`unstack` builds them).

    fuse: store wq|wk|wv as one `[D, N + 2K, H]` weight and w1|w3 as one `[D, 2F]` (FP8: with their
    scales, `BlockWeights.fused`), so a decode step runs 4 projection dots per layer instead of 7.
    Default: on a single device. On a mesh the head and FFN axes are split over the tensor axis, where
    a concatenated axis would put q, k and v rows on the wrong devices, so the projections stay
    separate there.
    """
    fuse = model.sharding is None if fuse is None else fuse
    stacked = _stacked_leaves(model)
    cached = _LAYER_WEIGHTS.get(model)
    if (
        cached is not None
        and cached[0] == fuse
        and len(cached[1]) == len(stacked)
        and all(r() is a for r, a in zip(cached[1], stacked, strict=True))
    ):
        return cached[2]
    graphdef, state = nnx.split(model)
    layers = unstack(graphdef, state, fuse=fuse)
    _LAYER_WEIGHTS[model] = (fuse, [weakref.ref(a) for a in stacked], layers)
    return layers


@functools.partial(jax.jit, static_argnames=("graphdef", "fuse"))
def unstack(graphdef, state, *, fuse: bool) -> LayerWeights:
    """Layer i's `BlockWeights` cut out of the stacked `[L, ...]` weights, one copy; an FP8 model's
    unquantized layers with their `dense_ffn` feed-forward in place of the (unused) FP8 slot.

    Inside the decode `while_loop` XLA materialises every static slice of a stacked weight on every
    step (a `slice` fusion per weight, per layer, per step); arrays of their own are read in place."""
    layers = nnx.merge(graphdef, state).layer_weights()
    return tuple(w.fused() for w in layers) if fuse else layers

"""The jitted generation programs, and the weights their decode steps read.

    prefill(graphdef, params, prompts, lengths, ...) → DecodeState   `generate`: the prompts into the cache, token 0
    decode(graphdef, params, layers, state, limit, ...) → DecodeState `generate`: a `lax.while_loop` of decode steps
    chunk_prefill(...), burst(...)                                    the engine's, over the paged cache

All are pure in the parameter state (`nnx.merge` inside the trace) and donate the cache. Nothing per
token returns to the host: the loops record tokens, logprobs and top-K alternatives on device. Every
token is picked by one function (`_pick`: `sampling.sample_rows`, stop ids, logprobs, top-K).

The decode step runs the layers one by one from `layer_weights(model)`: each layer's weights as
arrays of their own, cut from the stacked `[L, ...]` buffers once per model and kept with it. From
the stacked buffers, XLA copies every layer's weights out of them on every step, inside the loop
(scanned or unrolled alike; `tests/test_decode_program.py` reads the compiled loop to keep it so).
The price: the layer weights are held twice (`decode_unroll` falls back to the scan where that copy
would not fit, `LAYER_COPY_BUDGET`), and the decode program's compile time grows with depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.kv_cache import KVCache
from llama_jax.model import BlockWeights
from llama_jax.paged_cache import PagedKVCache
from llama_jax.sampling import Mode, sample_rows

__all__ = [
    "DecodeState",
    "burst",
    "chunk_prefill",
    "decode",
    "decode_unroll",
    "layer_weights",
    "unstack",
    "pick_rows",
    "prefill",
    "trace_counts",
]

_TRACES = {"prefill": 0, "decode": 0, "chunk_prefill": 0, "burst": 0}


def trace_counts() -> dict[str, int]:
    """How many times each jitted program was traced (= compiled) in this process."""
    return dict(_TRACES)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The decode loop's carry. B rows (padding rows included), N output slots."""

    cache: KVCache
    last: jax.Array  # [B] int32: the token to feed next
    positions: jax.Array  # [B] int32: its position (= the cache entry it writes)
    step: jax.Array  # [] int32: loop steps done (= output slot of the next token)
    tokens: jax.Array  # [B, N] int32: sampled tokens (valid up to `counts`, plus the stop token)
    logprobs: jax.Array  # [B, N] float32 ([B, 0] when not asked for)
    top_ids: jax.Array  # [B, N, K] int32: the K most likely ids at each step ([B, 0, 0] when K = 0)
    top_logprobs: jax.Array  # [B, N, K] float32: their log-softmax
    counts: jax.Array  # [B] int32: tokens emitted, stop token excluded
    done: jax.Array  # [B] bool: stopped, or a padding row
    stopped: jax.Array  # [B] bool: ended by a stop token
    keys: jax.Array  # [B] PRNG keys, one stream per row


@functools.partial(jax.jit, static_argnames=("graphdef", "n_out", "mode"), donate_argnames=("cache",))
def prefill(
    graphdef, params, prompt_bp, lengths_b, active_b, cache, seeds_b, streams_b, knobs, stop_ids, *, n_out, mode: Mode
):
    """Run the prompts into the cache and sample the first new token from each row's last prompt logits."""
    _TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    logits_bv, cache = model.prefill(prompt_bp, cache, lengths_b)  # only the B last positions reach the head
    b = prompt_bp.shape[0]
    last = jnp.take_along_axis(prompt_bp, (lengths_b - 1)[:, None], axis=1)[:, 0]
    keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(seeds_b, streams_b)
    k, n_top = mode.top_logprobs, (n_out if mode.top_logprobs else 0)
    state = DecodeState(
        cache=cache,
        last=last,
        positions=lengths_b - 1,
        step=jnp.int32(0),
        tokens=jnp.zeros((b, n_out), jnp.int32),
        logprobs=jnp.zeros((b, n_out if mode.logprobs else 0), jnp.float32),
        top_ids=jnp.zeros((b, n_top, k), jnp.int32),
        top_logprobs=jnp.zeros((b, n_top, k), jnp.float32),
        counts=jnp.zeros((b,), jnp.int32),
        done=~active_b,
        stopped=jnp.zeros((b,), bool),
        keys=keys,
    )
    return advance(state, logits_bv, cache, knobs, stop_ids, mode)


def _pick(keys_b, logits_bv, knobs, stops_bs, mode: Mode):
    """Each row's token drawn with its key (`sampling.sample_rows`), whether it is one of the row's stop
    ids (`stops_bs [B or 1, S]`), its log-softmax under the untempered logits and the top-K
    alternatives (zeros where the mode does not ask for them)."""
    token_b = sample_rows(keys_b, logits_bv, knobs, mode)
    b, k = logits_bv.shape[0], mode.top_logprobs
    logp_b, top_bk, ids_bk = jnp.zeros((b,)), jnp.zeros((b, k)), jnp.zeros((b, k), jnp.int32)
    if mode.logprobs or k:
        logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
        logp_b = jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]
        if k:
            top_bk, ids_bk = jax.lax.top_k(logp_bv, k)
    is_stop = jnp.any(token_b[:, None] == stops_bs, axis=-1)
    return token_b, is_stop, logp_b, ids_bk.astype(jnp.int32), top_bk


def advance(s: DecodeState, logits_bv, cache, knobs, stop_ids, mode: Mode) -> DecodeState:
    """Sample each row's next token from `logits_bv` (the logits at its current position), record it."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.keys, s.step)
    token, is_stop, logp_b, ids_bk, top_bk = _pick(keys, logits_bv, knobs, stop_ids[None, :], mode)
    live = ~s.done
    logprobs, top_ids, top_logprobs = s.logprobs, s.top_ids, s.top_logprobs
    if mode.logprobs:
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logp_b[:, None], s.step, axis=1)
    if mode.top_logprobs:
        top_ids = jax.lax.dynamic_update_slice_in_dim(top_ids, ids_bk[:, None], s.step, axis=1)
        top_logprobs = jax.lax.dynamic_update_slice_in_dim(top_logprobs, top_bk[:, None], s.step, axis=1)
    return DecodeState(
        cache=cache,
        last=jnp.where(live, token, s.last),
        positions=jnp.where(live, s.positions + 1, s.positions),
        step=s.step + 1,
        tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1),
        logprobs=logprobs,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
        counts=s.counts + (live & ~is_stop).astype(jnp.int32),
        done=s.done | is_stop,
        stopped=s.stopped | (live & is_stop),
        keys=s.keys,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "unroll"), donate_argnames=("state",))
def decode(graphdef, params, layers, state: DecodeState, limit, knobs, stop_ids, *, mode: Mode, unroll):
    """Run decode steps until `state.step == limit` or every row is done.

    layers: `LayerWeights` (each weight read in place), or None to scan the stacked weights with `unroll`.
    """
    _TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits_b1v, cache = model.decode(s.last[:, None], s.positions[:, None], s.cache, unroll=unroll, layers=layers)
        return advance(s, logits_b1v[:, 0], cache, knobs, stop_ids, mode)

    return jax.lax.while_loop(cond, body, state)


# ---- the engine's programs: chunked prefill and decode bursts over the paged cache ---------------------


def pick_rows(seeds_b, index_b, logits_bv, knobs_b3, stops_bs, mode: Mode):
    """Token index_b[b] of each row: sampled with the key fold_in(fold_in(key(seed), 0), index), the
    sampler's per-row stream, under the row's own knobs; plus its logprob and the top-K alternatives
    (untempered), and whether it is one of the row's stop tokens."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), i))(seeds_b, index_b)
    return _pick(keys, logits_bv, knobs_b3, stops_bs, mode)


@functools.partial(jax.jit, static_argnames=("graphdef", "block_pages", "mode"), donate_argnames=("k", "v"))
def chunk_prefill(
    graphdef, params, k, v, page_table_rm, tokens_rc, start_r, last_r, seeds_r, knobs_r3, stops_rs, *, block_pages, mode
):
    """One prompt chunk of R slots into their pages; → pool, and token 0 from each row's `last_r` logits."""
    _TRACES["chunk_prefill"] += 1
    model = nnx.merge(graphdef, params)
    c = tokens_rc.shape[1]
    positions_rc = start_r[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    cache = PagedKVCache(k, v, page_table_rm, block_pages)
    logits_r1v, cache = model.forward(tokens_rc, positions_rc, cache, use_cache=True, logits_at=last_r[:, None])
    picked = pick_rows(seeds_r, jnp.zeros_like(start_r), logits_r1v[:, 0], knobs_r3, stops_rs, mode)
    return cache.k, cache.v, picked


@functools.partial(
    jax.jit, static_argnames=("graphdef", "burst", "block_pages", "mode", "unroll"), donate_argnames=("k", "v")
)
def burst(
    graphdef,
    params,
    layers,
    k,
    v,
    page_table_bm,
    last_b,
    count_b,
    position_b,
    limit_b,
    live_b,
    seeds_b,
    knobs_b3,
    stops_bs,
    *,
    burst,
    block_pages,
    mode,
    unroll,
):
    """Up to `burst` decode steps of every live slot: feed its last token at its position, sample token
    `count` of its request. → pool, the burst's tokens `[B, burst]` (-1 where a slot had finished) and
    their logprobs / top-K."""
    _TRACES["burst"] += 1
    model = nnx.merge(graphdef, params)
    b, k_top = last_b.shape[0], mode.top_logprobs
    out = dict(
        tokens=jnp.full((b, burst), -1, jnp.int32),
        logprobs=jnp.zeros((b, burst)),
        top_ids=jnp.zeros((b, burst, k_top), jnp.int32),
        top_logprobs=jnp.zeros((b, burst, k_top)),
    )

    def cond(carry):
        step, live_b = carry[0], carry[5]
        return (step < burst) & jnp.any(live_b)

    def body(carry):
        step, k, v, last_b, count_b, live_b, position_b, out = carry
        cache = PagedKVCache(k, v, page_table_bm, block_pages)
        logits_b1v, cache = model.decode(last_b[:, None], position_b[:, None], cache, unroll=unroll or 1, layers=layers)
        token_b, is_stop, logp_b, ids_bk, top_bk = pick_rows(
            seeds_b, count_b, logits_b1v[:, 0], knobs_b3, stops_bs, mode
        )
        new = dict(tokens=jnp.where(live_b, token_b, -1), logprobs=logp_b, top_ids=ids_bk, top_logprobs=top_bk)
        out = {name: jax.lax.dynamic_update_index_in_dim(out[name], new[name], step, axis=1) for name in out}
        count_b = count_b + live_b.astype(jnp.int32)
        finished = live_b & (is_stop | (count_b >= limit_b))
        return (
            step + 1,
            cache.k,
            cache.v,
            jnp.where(live_b, token_b, last_b),
            count_b,
            live_b & ~finished,
            position_b + 1,
            out,
        )

    carry = (jnp.int32(0), k, v, last_b, count_b, live_b, position_b, out)
    _, k, v, *_, out = jax.lax.while_loop(cond, body, carry)
    return k, v, out


# ---- the per-layer weights of the decode step ---------------------------------------------------------

# Each layer's weights as arrays of their own, in the order the decode step runs them (`Llama.forward(layers=)`).
LayerWeights = tuple[BlockWeights, ...]

# Per model: its `LayerWeights` and weak references to the stacked leaves they were cut from, so new
# weights (a training step, `nnx.update`) are noticed. Weak on the model: the copy dies with it.
_LAYER_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# The per-layer decode copy may take at most this fraction of any device's memory. Past it (405B on
# 8 or 16 H100s, say) the decode step scans the stacked weights instead: slower per step, but the
# weights are not held twice where they barely fit once.
LAYER_COPY_BUDGET = 0.25


def device_memory_limit(device) -> int | None:
    """Bytes the device can hold, or None where it does not say (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


def _stacked_leaves(model) -> list:
    return jax.tree.leaves([nnx.state(m) for m in (model.layers, model.dense_ffn) if m is not None])


def layer_copies_fit(model, budget: float = LAYER_COPY_BUDGET) -> bool:
    """Whether the per-layer copy of the layer weights takes at most `budget` of every device's memory."""
    per_device: dict = {}
    for a in _stacked_leaves(model):
        sharding = getattr(a, "sharding", None)
        if sharding is None:
            continue
        nbytes = math.prod(sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for device in sharding.addressable_devices:
            per_device[device] = per_device.get(device, 0) + nbytes
    for device, nbytes in per_device.items():
        limit = device_memory_limit(device)
        if limit is not None and nbytes > budget * limit:
            return False
    return True


def decode_unroll(model, unroll: int | bool | None) -> int | bool | None:
    """What `unroll=None` means for this model: per-layer weights (None) where their copy fits
    (`layer_copies_fit`), else a rolled scan over the stacked weights (1)."""
    if unroll is not None:
        return unroll
    return None if layer_copies_fit(model) else 1


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
    model = nnx.merge(graphdef, state)
    n = model.config.n_layers
    fp8 = model.options.fp8
    slots = fp8.dense_slots(n) if fp8 is not None else (-1,) * n
    layers = []
    for i, slot in enumerate(slots):
        w = _row(model.layers, i).weights()
        if slot >= 0:
            w = dataclasses.replace(w, feed_forward=_row(model.dense_ffn, slot).weights())
        layers.append(w.fused() if fuse else w)
    return tuple(layers)


def _row(stacked: nnx.Module, i: int) -> nnx.Module:
    """Row i of a module stacked over layers."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

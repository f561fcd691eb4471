"""A continuous-batching engine: fixed decode slots over a paged KV cache, with prefix sharing.

    engine = Engine(model, slots=32, pages=4096, page_size=64, burst=16, temperature=0.6, top_p=0.9)
    for request, result in engine.run(requests):      # Request(id, prompt, max_new_tokens, seed)
        ...                                            # in completion order; result: GenerationResult | ValueError

docs/BATCH.md draws it. One scheduler iteration on the host:

1. Admit: waiting requests take free slots while the page pool can hold their prompts. A prompt's
   full page-aligned blocks are looked up in the prefix cache first (`paged_cache.PagePool`): a hit
   shares the page (reference-counted) instead of prefilling it again.
2. Prefill: one jitted call runs the next `prefill_chunk` prompt tokens of up to `prefill_rows` slots
   through the model into their pages; a slot whose prompt ends in the chunk samples its first token.
3. Decode: one jitted burst of up to `burst` steps (`lax.while_loop`) over every decoding slot. Nothing
   per token crosses to the host: the burst returns its `[slots, burst]` tokens once.
4. Finished requests (stop token or `max_new_tokens`) free their slot and pages; they are yielded.

Before a burst every decoding slot gets the pages its next `burst` positions need. When the pool is
dry the most recently admitted request is preempted: its pages go back and it waits at the head of the
queue, to be recomputed from its prompt. That is exact: token i of a request is drawn with the key
`fold_in(fold_in(key(seed), 0), i)`, the stream `sampler.generate(seed=[seed, ...])` gives it, so a
request's tokens depend on its prompt and seed, not on its neighbours, its slot, or when it ran.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import sampler
from llama_jax.paged_cache import NULL_PAGE, PagedKVCache, PagePool, block_hashes
from llama_jax.sampling import SamplingParams, filter_logits

__all__ = ["Engine", "Request", "trace_counts"]

_TRACES = {"prefill": 0, "decode": 0}


def trace_counts() -> dict[str, int]:
    """How many times each engine program was traced (= compiled) in this process."""
    return dict(_TRACES)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) to continue by up to `max_new_tokens`, sampled from its own `seed`."""

    id: Any
    prompt: Sequence[int]
    max_new_tokens: int
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class _Sampling:
    """The engine's sampling configuration (static: it shapes the compiled programs)."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    logprobs: bool
    top_logprobs: int


@dataclasses.dataclass
class _Slot:
    """A running request, host side."""

    request: Request
    order: int  # admission order (preemption takes the latest)
    prompt: np.ndarray
    pages: list[int]
    hashes: list[bytes]  # of the prompt's shareable blocks
    cursor: int  # prompt tokens in the cache
    stopped: bool = False  # the last token is a stop token
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_ids: list[list[int]] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[float]] = dataclasses.field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.cursor == len(self.prompt)


def _pick(seeds_b, index_b, logits_bv, sampling: _Sampling, stop_ids):
    """Token index_b[b] of each row: sampled with the key fold_in(fold_in(key(seed), 0), index), the
    sampler's per-row stream; plus its logprob and the top-K alternatives (untempered)."""
    if sampling.temperature == 0:
        token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    else:
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), 0), i))(seeds_b, index_b)
        filtered = filter_logits(
            logits_bv,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
        )
        token_b = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    b, k = logits_bv.shape[0], sampling.top_logprobs
    logp_b, top_bk, ids_bk = jnp.zeros((b,)), jnp.zeros((b, k)), jnp.zeros((b, k), jnp.int32)
    if sampling.logprobs or k:
        logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
        logp_b = jnp.take_along_axis(logp_bv, token_b[:, None], axis=-1)[:, 0]
        if k:
            top_bk, ids_bk = jax.lax.top_k(logp_bv, k)
    is_stop = jnp.any(token_b[:, None] == stop_ids[None, :], axis=-1)
    return token_b, is_stop, logp_b, ids_bk.astype(jnp.int32), top_bk


@functools.partial(jax.jit, static_argnames=("graphdef", "block_pages", "sampling"), donate_argnames=("k", "v"))
def _prefill(
    graphdef, params, k, v, page_table_rm, tokens_rc, start_r, last_r, seeds_r, stop_ids, *, block_pages, sampling
):
    """One prompt chunk of R slots into their pages; → pool, and token 0 from each row's `last_r` logits."""
    _TRACES["prefill"] += 1
    model = nnx.merge(graphdef, params)
    c = tokens_rc.shape[1]
    positions_rc = start_r[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    cache = PagedKVCache(k, v, page_table_rm, block_pages)
    logits_r1v, cache = model.forward(tokens_rc, positions_rc, cache, use_cache=True, logits_at=last_r[:, None])
    picked = _pick(seeds_r, jnp.zeros_like(start_r), logits_r1v[:, 0], sampling, stop_ids)
    return cache.k, cache.v, picked


@functools.partial(
    jax.jit, static_argnames=("graphdef", "burst", "block_pages", "sampling", "unroll"), donate_argnames=("k", "v")
)
def _decode(
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
    stop_ids,
    *,
    burst,
    block_pages,
    sampling,
    unroll,
):
    """Up to `burst` decode steps of every live slot: feed its last token at its position, sample token
    `count` of its request. → pool, the burst's tokens `[B, burst]` (-1 where a slot had finished) and
    their logprobs / top-K."""
    _TRACES["decode"] += 1
    model = nnx.merge(graphdef, params)
    b, k_top = last_b.shape[0], sampling.top_logprobs
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
        token_b, is_stop, logp_b, ids_bk, top_bk = _pick(seeds_b, count_b, logits_b1v[:, 0], sampling, stop_ids)
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


class Engine:
    """Continuous batching over a paged KV cache (see the module doc).

    Args:
      model: a `Llama` (one device; on a mesh the pool follows the model's rules).
      slots: requests decoded together (the decode batch).
      pages: pages in the pool (page 0 is the null page); default: `slots` x 2,048 tokens' worth.
      page_size: positions per page; prefix sharing works in whole pages.
      burst: decode steps per jitted call between host-side scheduling.
      prefill_chunk, prefill_rows: a prefill call runs `prefill_chunk` prompt tokens of up to `prefill_rows` slots.
      prefix_cache: share full prompt blocks between requests (off: every prompt is prefilled whole).
      temperature, top_k, top_p, min_p: as `sampler.generate` (one setting per engine).
      logprobs, top_logprobs: as `sampler.generate`.
      stop_tokens: None: `sampler.default_stop_tokens(model)`.
      max_len: the longest request (prompt + new tokens) a slot may hold; default the model's context.
    """

    def __init__(
        self,
        model,
        *,
        slots: int = 16,
        pages: int | None = None,
        page_size: int = 64,
        burst: int = 16,
        prefill_chunk: int = 256,
        prefill_rows: int = 4,
        prefix_cache: bool = True,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        logprobs: bool = False,
        top_logprobs: int = 0,
        stop_tokens: Sequence[int] | None = None,
        max_len: int | None = None,
        block_pages: int = 4,
    ) -> None:
        for name, value in dict(
            slots=slots,
            page_size=page_size,
            burst=burst,
            prefill_chunk=prefill_chunk,
            prefill_rows=prefill_rows,
            block_pages=block_pages,
        ).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Engine: {name} must be an integer >= 1, got {value!r}")
        config = model.config
        if getattr(model, "score", None) is not None:
            raise ValueError("this model has a sequence-classification head instead of an LM head: it cannot generate")
        SamplingParams(
            max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, top_logprobs=top_logprobs
        ).check_vocab(config.vocab_size)  # validates the settings
        self.model = model
        self.max_len = min(max_len or config.max_seq_len, config.max_seq_len)
        self.page_size, self.burst, self.block_pages = page_size, burst, block_pages
        self.prefill_chunk, self.prefill_rows = prefill_chunk, min(prefill_rows, slots)
        self.slots = slots
        n_blocks = -(-self.max_len // (page_size * block_pages))
        self.table_width = n_blocks * block_pages  # M: pages per slot's page table
        self.pool = PagePool(pages or slots * -(-2048 // page_size) + 1, prefix_cache)
        self.sampling = _Sampling(
            float(temperature), int(top_k), float(top_p), float(min_p), bool(logprobs), int(top_logprobs)
        )
        self.stop_ids = _stop_ids(model, stop_tokens)
        self.k, self.v = PagedKVCache.zeros(
            config, self.pool.n_pages, page_size, model.dtype, getattr(model, "sharding", None)
        )
        self.ready = np.zeros(self.pool.n_pages, bool)  # page written (a sharer may read it)
        self.stats = collections.Counter()

    # ---- the scheduler ---------------------------------------------------------------------------------

    def run(self, requests: Iterable[Request]) -> Iterator[tuple[Request, sampler.GenerationResult | ValueError]]:
        """Run the requests (pulled from the iterable as slots free up); yield (request, result) as each
        finishes: a `GenerationResult`, or a `ValueError` for a request that cannot run (too long, bad ids)."""
        graphdef, params = nnx.split(self.model)
        unroll = sampler.decode_unroll(self.model, None)
        layers = sampler.layer_weights(self.model) if unroll is None else None
        weights = (graphdef, params, layers, unroll)
        pending = iter(requests)
        waiting: collections.deque[Request] = collections.deque()
        slots: list[_Slot | None] = [None] * self.slots
        order = itertools.count()
        done: list[tuple[Request, Any]] = []
        while True:
            if not waiting:
                waiting.extend(itertools.islice(pending, self.slots))
            self._admit(waiting, slots, order, done)
            if not waiting and all(s is None for s in slots):
                yield from done
                return
            self._prefill_step(weights, slots, done)
            self._decode_step(weights, slots, waiting, done)
            yield from done
            done.clear()

    def generate(self, requests: Sequence[Request]) -> list[sampler.GenerationResult | ValueError]:
        """`run`, with the results in the order of `requests`."""
        results = dict((id(r), out) for r, out in self.run(requests))
        return [results[id(r)] for r in requests]

    def _check(self, request: Request) -> np.ndarray:
        prompt = np.asarray(request.prompt)
        vocab = self.model.config.vocab_size
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(f"request {request.id!r}: the prompt must be a non-empty list of token ids")
        if np.any((prompt < 0) | (prompt >= vocab)):
            raise ValueError(f"request {request.id!r}: a prompt token id is outside the vocabulary [0, {vocab})")
        if not (isinstance(request.max_new_tokens, (int, np.integer)) and request.max_new_tokens >= 1):
            raise ValueError(f"request {request.id!r}: max_new_tokens must be an integer >= 1")
        needed = prompt.size + request.max_new_tokens
        if needed > self.max_len:
            raise ValueError(
                f"request {request.id!r}: prompt too long: {prompt.size} tokens + max_new_tokens="
                f"{request.max_new_tokens} = {needed} positions, beyond the context of {self.max_len}"
            )
        if self._pages_for(needed - 1) > self.pool.n_pages - 1:
            raise ValueError(
                f"request {request.id!r} needs {self._pages_for(needed - 1)} pages; the pool has "
                f"{self.pool.n_pages - 1}: give the engine more pages"
            )
        return prompt.astype(np.int32)

    def _pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def _admit(self, waiting, slots, order, done) -> None:
        while waiting and None in slots:
            request = waiting[0]
            try:
                prompt = self._check(request)
            except ValueError as e:
                waiting.popleft()
                done.append((request, e))
                continue
            shareable = (len(prompt) - 1) // self.page_size  # the last prompt token is always computed
            hashes = block_hashes(prompt, self.page_size, shareable) if self.pool.prefix_cache else []
            shared = self.pool.lookup(hashes)
            fresh = self.pool.allocate(self._pages_for(len(prompt)) - len(shared))
            if fresh is None:
                self.pool.release(shared)
                if all(s is None for s in slots):  # nothing will free pages: the pool is too small
                    raise RuntimeError("page pool exhausted with no request running")
                return  # wait for pages
            waiting.popleft()
            self.ready[fresh] = False
            for j in range(len(shared), len(hashes)):
                self.pool.register(fresh[j - len(shared)], hashes[j])
            self.stats["prompt_tokens"] += len(prompt)
            self.stats["shared_tokens"] += len(shared) * self.page_size
            slots[slots.index(None)] = _Slot(
                request, next(order), prompt, shared + fresh, hashes, cursor=len(shared) * self.page_size
            )

    def _table(self, slots: Sequence[_Slot | None]) -> np.ndarray:
        table = np.full((len(slots), self.table_width), NULL_PAGE, np.int32)
        for row, slot in enumerate(slots):
            if slot is not None:
                table[row, : len(slot.pages)] = slot.pages
        return table

    def _prefill_step(self, weights, slots, done) -> None:
        """One chunk for the first `prefill_rows` prefilling slots whose shared pages are written."""
        rows = [
            s
            for s in slots
            if s is not None and not s.decoding and all(self.ready[p] for p in s.pages[: s.cursor // self.page_size])
        ]
        rows = sorted(rows, key=lambda s: s.order)[: self.prefill_rows]
        if not rows:
            return
        r, c = self.prefill_rows, self.prefill_chunk
        tokens = np.zeros((r, c), np.int32)
        start, last, seeds = np.zeros(r, np.int32), np.zeros(r, np.int32), np.zeros(r, np.uint32)
        for i, s in enumerate(rows):
            chunk = s.prompt[s.cursor : s.cursor + c]
            tokens[i, : len(chunk)] = chunk
            start[i], last[i], seeds[i] = s.cursor, len(chunk) - 1, s.request.seed
        graphdef, params, _, _ = weights
        self.k, self.v, picked = _prefill(
            graphdef,
            params,
            self.k,
            self.v,
            self._table(rows + [None] * (r - len(rows))),
            tokens,
            start,
            last,
            seeds,
            self.stop_ids,
            block_pages=self.block_pages,
            sampling=self.sampling,
        )
        self.stats["prefill_calls"] += 1
        picked = _to_host(picked)
        for i, s in enumerate(rows):
            s.cursor = min(s.cursor + c, len(s.prompt))
            self.ready[s.pages[: s.cursor // self.page_size]] = True
            if s.decoding:
                self._record(s, *(x[i] for x in picked))
                self._finish_if_done(s, slots, done)

    def _record(self, s: _Slot, token, is_stop, logp, ids, top) -> None:
        s.tokens.append(int(token))
        s.logprobs.append(float(logp))
        s.top_ids.append([int(x) for x in ids])
        s.top_logprobs.append([float(x) for x in top])
        s.stopped = bool(is_stop)

    def _finish_if_done(self, s: _Slot, slots, done) -> None:
        stopped = s.stopped
        if not stopped and len(s.tokens) < s.request.max_new_tokens:
            return
        n = len(s.tokens) - stopped
        k = len(s.tokens) if self.sampling.top_logprobs else 0
        result = sampler.GenerationResult(
            tokens=tuple(s.tokens[:n]),
            stop_reason="stop" if stopped else "length",
            stop_token=s.tokens[-1] if stopped else None,
            logprobs=tuple(s.logprobs[:n]) if self.sampling.logprobs else None,
            top_logprobs=(tuple(map(tuple, s.top_ids[:k])), tuple(map(tuple, s.top_logprobs[:k]))) if k else None,
        )
        self._free(s, slots)
        self.stats["generated_tokens"] += n
        done.append((s.request, result))

    def _free(self, s: _Slot, slots) -> None:
        for page in s.pages:  # an unwritten page must not stay in the prefix cache
            if not self.ready[page] and self.pool.refs[page] == 1:
                self.pool.forget(page)
        self.pool.release(s.pages)
        slots[slots.index(s)] = None

    def _grow(self, slots, waiting) -> None:
        """Give every decoding slot the pages of its next burst, preempting the latest admitted when dry."""
        for s in sorted((s for s in slots if s is not None and s.decoding), key=lambda s: s.order):
            if s not in slots:  # preempted meanwhile
                continue
            last_position = min(
                len(s.prompt) + len(s.tokens) - 1 + self.burst - 1, len(s.prompt) + s.request.max_new_tokens - 2
            )
            while (need := self._pages_for(last_position + 1) - len(s.pages)) > 0:
                fresh = self.pool.allocate(need)
                if fresh is not None:
                    self.ready[fresh] = False
                    s.pages.extend(fresh)
                    break
                victim = max((v for v in slots if v is not None), key=lambda v: v.order)
                self._free(victim, slots)
                waiting.appendleft(victim.request)
                self.stats["preemptions"] += 1
                if victim is s:
                    break

    def _decode_step(self, weights, slots, waiting, done) -> None:
        self._grow(slots, waiting)
        rows = [s if s is not None and s.decoding else None for s in slots]
        if all(s is None for s in rows):
            return
        b = self.slots
        last, count, position, limit = (np.zeros(b, np.int32) for _ in range(4))
        live, seeds = np.zeros(b, bool), np.zeros(b, np.uint32)
        for i, s in enumerate(rows):
            if s is not None:
                last[i], count[i], limit[i] = s.tokens[-1], len(s.tokens), s.request.max_new_tokens
                position[i], live[i], seeds[i] = len(s.prompt) + len(s.tokens) - 1, True, s.request.seed
        graphdef, params, layers, unroll = weights
        self.k, self.v, out = _decode(
            graphdef,
            params,
            layers,
            self.k,
            self.v,
            self._table(rows),
            last,
            count,
            position,
            limit,
            live,
            seeds,
            self.stop_ids,
            burst=self.burst,
            block_pages=self.block_pages,
            sampling=self.sampling,
            unroll=unroll,
        )
        self.stats["decode_calls"] += 1
        out = _to_host(out)
        for i, s in enumerate(rows):
            if s is None:
                continue
            for step in np.flatnonzero(out["tokens"][i] >= 0):
                token = out["tokens"][i, step]
                self._record(
                    s,
                    token,
                    token in self.stop_ids,
                    out["logprobs"][i, step],
                    out["top_ids"][i, step],
                    out["top_logprobs"][i, step],
                )
            self._finish_if_done(s, slots, done)


def _to_host(tree):
    """Fetch outputs to this host; on several processes an output spanning devices of others is
    all-gathered first (every process then schedules from the same values)."""
    from jax.experimental import multihost_utils

    def one(x):
        return jax.device_get(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def _stop_ids(model, stop_tokens) -> np.ndarray:
    stop = sorted({int(t) for t in (sampler.default_stop_tokens(model) if stop_tokens is None else stop_tokens)})
    if len(stop) > sampler.MAX_STOP_TOKENS:
        raise ValueError(f"at most {sampler.MAX_STOP_TOKENS} stop tokens are supported, got {len(stop)}")
    if any(not 0 <= t < model.config.vocab_size for t in stop):
        raise ValueError(f"a stop token is outside the vocabulary [0, {model.config.vocab_size})")
    return np.asarray(stop + [-1] * (sampler.MAX_STOP_TOKENS - len(stop)), np.int32)

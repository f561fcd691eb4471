"""A continuous-batching engine: fixed decode slots over a paged KV cache, with prefix sharing.

    engine = Engine(model, slots=32, pages=4096, page_size=64, burst=16)
    for request, result in engine.run(requests):      # Request(id, prompt, SamplingParams(...))
        ...                                            # in completion order; result: GenerationResult | ValueError

Every request carries its own `SamplingParams` (max_new_tokens, temperature, top-k/p, min-p, seed,
stop tokens, logprobs). Requests whose settings share a static `sampling.Mode` decode together, each
row with its own traced knobs, seed and stop tokens; slots of another mode wait for their own burst.
One engine, one page pool, whatever the mix of settings.

docs/BATCH.md draws it. One scheduler iteration on the host:

1. Admit: waiting requests are staged (at most `prefill_rows` of them) while the page pool can hold
   their prompts. A prompt's full page-aligned blocks are looked up in the prefix cache first
   (`paged_cache.PagePool`): a hit shares the page (reference-counted) instead of prefilling it again.
2. Prefill: a prompt needs pages, not a slot. Jitted calls each run the next (up to) `prefill_chunk`
   prompt tokens of up to `prefill_rows` staged requests into their pages, until every staged prompt
   is in (or `prefill_budget` tokens ran); a prompt that ends in a chunk samples its first token. A
   call costs the same with one prompt as with all its rows, so calls wait until the staged prompts
   fill one, unless a slot is free that no prefilled request can take.
3. Seat: prefilled requests take the free slots, in admission order.
4. Decode: one jitted burst of up to `burst` steps (`lax.while_loop`) over every decoding slot. Nothing
   per token crosses to the host: the burst returns its `[slots, burst]` tokens once.
5. Finished requests (stop token or `max_new_tokens`) free their slot and pages; they are yielded.

Before a burst every decoding slot gets the pages its next `burst` positions need. When the pool is
dry the most recently admitted request (staged or decoding) is preempted: its pages go back and it
waits at the head of the queue, to be recomputed from its prompt. That is exact: token i of a request
is drawn with the key `decoding.token_keys(seed, 0, i)`, the stream `sampler.generate(seed=[seed,
...])` gives it, so a request's tokens depend on its prompt and seed, not on its neighbours, its slot,
or when it ran.

Decode attention over the pages is chosen once, when the engine is built, from the model's attention
backend (`--attention`): `attention.select_paged` (a Pallas paged-attention kernel on one TPU or GPU, the
blockwise loop on CPU), which also lays out the pool for it (`paged_cache.pool_shape`).

The programs are `generate`'s (`decoding.prefill` on a prompt chunk, `decoding.decode` for a burst),
each call on a fresh `decoding.DecodeState` over the pool (`PagedKVCache`); the request check, the
stop tokens, the results and the host transfer are `llama_jax.inference.generation`'s; a running
request's host-side record (`Slot`) and the host arrays of a call over slots are `llama_jax.inference.slots`'.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from llama_jax.inference import constrain, decoding, generation
from llama_jax.inference.decoding import DecodeState, Rows, Weights
from llama_jax.inference.generation import GenerationResult
from llama_jax.inference.sampling import Mode, SamplingParams
from llama_jax.inference.slots import NEUTRAL_KNOBS, NO_STOPS, Slot, page_table, prefill_arrays, rows_of
from llama_jax.model import attention, paged_attention
from llama_jax.model.paged_cache import PagedKVCache, PagePool, block_hashes, pool_shape
from llama_jax.model.platform import target as target_platform

__all__ = ["Engine", "Request", "trace_counts"]


def trace_counts() -> dict[str, int]:
    """How many times each engine program was traced (= compiled) in this process."""
    return decoding.trace_counts()


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) to continue as `params` says (its `seed` an int: one stream per request)."""

    id: Any
    prompt: Sequence[int]
    params: SamplingParams


class Engine:
    """Continuous batching over a paged KV cache (see the module doc).

    Args:
      model: a `Llama` (one device; on a mesh the pool follows the model's rules).
      slots: requests decoded together (the decode batch).
      pages: pages in the pool (page 0 is the null page); default: `slots` x 2,048 tokens' worth.
      page_size: positions per page; prefix sharing works in whole pages.
      burst: decode steps per jitted call between host-side scheduling.
      prefill_chunk, prefill_rows: a prefill call runs up to `prefill_chunk` prompt tokens (the rows' longest
        remaining part, rounded up to a power of two) of up to `prefill_rows` staged requests (default:
        as many as slots); at most `prefill_rows` requests are staged.
      prefill_budget: prompt tokens prefilled between two bursts (at least one call). Default None: every
        staged prompt entirely (throughput; the decoding slots wait meanwhile). A number bounds that wait
        (latency), a long prompt then spanning bursts.
      prefix_cache: share full prompt blocks between requests (off: every prompt is prefilled whole).
      max_len: the longest request (prompt + new tokens) a slot may hold; default the model's context.
      tokenizer: the model's `Tokenizer`, for constrained requests (`json_schema`, `regex`, `choice`).
        While any decoding slot is constrained a burst runs its steps one call each, every row under
        its mask (`constrain`; all ones for the unconstrained rows, which decode in the same burst).

    `stats` counts, over the engine's life: prompt_tokens, shared_tokens (taken from the prefix cache),
    prefill_calls and prefill_seconds, decode_calls and decode_seconds, generated_tokens, preemptions,
    and grammar_seconds (host time computing constrained rows' masks, inside decode_seconds).
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
        prefill_rows: int | None = None,
        prefill_budget: int | None = None,
        prefix_cache: bool = True,
        max_len: int | None = None,
        block_pages: int = 4,
        tokenizer=None,
    ) -> None:
        for name, value in dict(
            slots=slots,
            page_size=page_size,
            burst=burst,
            prefill_chunk=prefill_chunk,
            prefill_rows=slots if prefill_rows is None else prefill_rows,
            block_pages=block_pages,
        ).items():
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Engine: {name} must be an integer >= 1, got {value!r}")
        if prefill_budget is not None and not (isinstance(prefill_budget, int) and prefill_budget >= 1):
            raise ValueError(f"Engine: prefill_budget must be None or an integer >= 1, got {prefill_budget!r}")
        config = model.config
        generation.check_can_generate(model)
        self.model = model
        self.max_len = min(max_len or config.max_seq_len, config.max_seq_len)
        self.page_size, self.burst, self.block_pages = page_size, burst, block_pages
        self.prefill_chunk, self.prefill_rows = prefill_chunk, min(prefill_rows or slots, slots)
        self.prefill_budget = prefill_budget
        self.slots = slots
        n_blocks = -(-self.max_len // (page_size * block_pages))
        self.table_width = n_blocks * block_pages  # M: pages per slot's page table
        self.pool = PagePool(pages or slots * -(-2048 // page_size) + 1, prefix_cache)
        self._stops: dict[tuple[int, ...] | None, np.ndarray] = {}  # stop_tokens -> padded ids
        spec = getattr(model, "sharding", None)
        kernel_pool = pool_shape(config, self.pool.n_pages, page_size, paged_attention.KERNELS[0])
        self.attention = attention.select_paged(
            model.options.attention_backend,
            platform=target_platform(),
            dtype=model.dtype,
            head_dim=config.head_dim,
            page=page_size,
            block_pages=block_pages,
            split=paged_attention.pool_split(spec, config, slots, kernel_pool),
        )
        self.k, self.v = PagedKVCache.zeros(config, self.pool.n_pages, page_size, model.dtype, spec, self.attention)
        self.ready = np.zeros(self.pool.n_pages, bool)  # page written (a sharer may read it)
        self.stats = collections.Counter()
        self.tokenizer = tokenizer  # the grammars of constrained requests are built from it on first need
        self.grammars: constrain.Grammars | None = None

    # ---- the scheduler ---------------------------------------------------------------------------------

    def run(self, requests: Iterable[Request]) -> Iterator[tuple[Request, GenerationResult | ValueError]]:
        """Run the requests (pulled from the iterable as slots free up); yield (request, result) as each
        finishes: a `GenerationResult`, or a `ValueError` for a request that cannot run (too long, bad ids)."""
        weights = Weights.of(self.model)
        pending = iter(requests)
        waiting: collections.deque[Request] = collections.deque()
        slots: list[Slot | None] = [None] * self.slots  # decoding requests, one per decode row
        staged: list[Slot] = []  # admitted: prefilling, or prefilled and waiting for a slot
        order = itertools.count()
        done: list[tuple[Request, Any]] = []
        while True:
            if not waiting:
                waiting.extend(itertools.islice(pending, self.slots))
            self._admit(waiting, staged, slots, order, done)
            if not waiting and not staged and all(s is None for s in slots):
                yield from done
                return
            self._prefill(weights, staged, slots, done)
            for s in [s for s in staged if s.decoding][: slots.count(None)]:  # seat the prefilled, in order
                staged.remove(s)
                slots[slots.index(None)] = s
            self._decode_step(weights, slots, staged, waiting, done)
            yield from done
            done.clear()

    def generate(self, requests: Sequence[Request]) -> list[GenerationResult | ValueError]:
        """`run`, with the results in the order of `requests`."""
        results = dict((id(r), out) for r, out in self.run(requests))
        return [results[id(r)] for r in requests]

    def _check(self, request: Request) -> tuple[np.ndarray, np.ndarray, constrain.Matcher | None]:
        """→ (the prompt as int32, the request's padded stop ids, its grammar state if constrained), or a
        ValueError naming the request."""
        params = request.params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"request {request.id!r}: params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(params.seed, (int, np.integer)):
            raise ValueError(f"request {request.id!r}: seed must be one integer (one stream per request)")
        vocab = self.model.config.vocab_size
        try:
            prompt = generation.check_prompt(request.prompt, "prompt", vocab, self.max_len, params.max_new_tokens)
            params.check_vocab(vocab)
            key = None if params.stop_tokens is None else tuple(params.stop_tokens)
            if key not in self._stops:
                self._stops[key] = generation.stop_ids(self.model, key)
            matcher = None
            if params.constraint is not None:
                if self.tokenizer is None:
                    raise ValueError(f"{params.constraint[0]}: constrained requests need Engine(..., tokenizer=...)")
                self.grammars = self.grammars or constrain.Grammars.of(self.tokenizer, vocab)
                matcher = self.grammars.matcher(params, self._stops[key])
        except ValueError as e:
            raise ValueError(f"request {request.id!r}: {e}") from None
        needed = prompt.size + params.max_new_tokens
        if self._pages_for(needed - 1) > self.pool.n_pages - 1:
            raise ValueError(
                f"request {request.id!r} needs {self._pages_for(needed - 1)} pages; the pool has "
                f"{self.pool.n_pages - 1}: give the engine more pages"
            )
        return prompt, self._stops[key], matcher

    def _pages_for(self, positions: int) -> int:
        return -(-positions // self.page_size)

    def _admit(self, waiting, staged, slots, order, done) -> None:
        """Stage waiting requests (at most `prefill_rows`) while the pool holds their prompts, keeping the
        pages the decoding slots' next burst needs."""
        n_decoding = sum(s is not None for s in slots)
        reserve = n_decoding * self._pages_for(self.burst)
        while waiting and len(staged) < self.prefill_rows:
            request = waiting[0]
            try:
                prompt, stops, matcher = self._check(request)
            except ValueError as e:
                waiting.popleft()
                done.append((request, e))
                continue
            shareable = (len(prompt) - 1) // self.page_size  # the last prompt token is always computed
            hashes = block_hashes(prompt, self.page_size, shareable) if self.pool.prefix_cache else []
            # Prompt log-probs need every prompt position's logits: such a prompt is prefilled whole (its
            # pages are still offered to the requests after it).
            shared = [] if request.params.prompt_logprobs else self.pool.lookup(hashes)
            needed = self._pages_for(len(prompt)) - len(shared)
            fresh = self.pool.allocate(needed) if self.pool.available() - needed >= reserve else None
            if fresh is None:
                self.pool.release(shared)
                if not staged and not n_decoding:  # nothing will free pages: the pool is too small
                    raise RuntimeError("page pool exhausted with no request running")
                return  # wait for pages
            waiting.popleft()
            self.ready[fresh] = False
            for j in range(len(shared), len(hashes)):
                self.pool.register(fresh[j - len(shared)], hashes[j])
            self.stats["prompt_tokens"] += len(prompt)
            self.stats["shared_tokens"] += len(shared) * self.page_size
            params = request.params
            staged.append(
                Slot(
                    request,
                    next(order),
                    params.mode,
                    params.knobs(),
                    stops,
                    prompt,
                    shared + fresh,
                    hashes,
                    cursor=len(shared) * self.page_size,
                    matcher=matcher,
                )
            )

    def _prefill(self, weights, staged, slots, done) -> None:
        """Prefill calls on the staged prompts, up to `prefill_budget` tokens. A call runs when its rows are
        full, or when a slot is free that no prefilled request can take; else the prompts wait for more
        (a call costs the same with one prompt as with `prefill_rows`)."""
        spent = 0
        while self.prefill_budget is None or spent < self.prefill_budget:
            prefilling = sum(not s.decoding for s in staged)
            seats = slots.count(None) - sum(s.decoding for s in staged)
            if not prefilling or (prefilling < self.prefill_rows and seats <= 0):
                return
            ran = self._prefill_step(weights, staged, slots, done)
            if not ran:  # every prefilling prompt waits for shared pages another has not written yet
                return
            spent += ran

    def _prefill_step(self, weights, staged, slots, done) -> int:
        """One chunk for the first `prefill_rows` prefilling staged prompts whose shared pages are written;
        → the prompt tokens it ran (0: none could run)."""
        rows = [
            s for s in staged if not s.decoding and all(self.ready[p] for p in s.pages[: s.cursor // self.page_size])
        ]
        rows = sorted(rows, key=lambda s: s.order)
        if not rows:
            return 0
        # The earliest admitted decides; rows of another mode, or scoring when it does not (prompt
        # log-probs), take a later call.
        mode, scoring = rows[0].mode, rows[0].request.params.prompt_logprobs
        rows = [s for s in rows if (s.mode, s.request.params.prompt_logprobs) == (mode, scoring)]
        rows = rows[: self.prefill_rows]
        # The chunk: the rows' longest remaining prompt part, rounded up to a power of two (>= 16), at
        # most `prefill_chunk`: short prompts are not padded to a full chunk (a few programs per mode).
        # The rows stay `prefill_rows`, whatever the number of prompts: a row's numbers must not depend
        # on how many others it ran with (a resumed batch job writes the same bytes), and XLA's matrix
        # products round differently as their row count changes. For the same reason a call that scores
        # prompts (prompt log-probs, every position's value written out) runs whole `prefill_chunk` chunks:
        # a scored prompt is then cut the same way whatever its neighbours' lengths.
        longest = max(len(s.prompt) - s.cursor for s in rows)
        c = self.prefill_chunk if scoring else min(self.prefill_chunk, max(16, 1 << (longest - 1).bit_length()))
        r = self.prefill_rows
        prompt, sampling, limit, live = prefill_arrays(rows, r, c, scoring)
        zeros = np.zeros(r, np.int32)
        padded = rows + [None] * (r - len(rows))
        state = self._state(
            padded,
            sampling,
            mode,
            n_out=1,
            last=zeros,
            positions=zeros,
            count=zeros,
            limit=limit,
            live=live,
            mask=self._masks([s.matcher if s else None for s in padded]),
        )
        started = time.perf_counter()
        state = decoding.prefill(weights, state, prompt)
        self.k, self.v = state.cache.k, state.cache.v
        out, count, stopped, scores = generation.to_host((state.out, state.count, state.stopped, state.prompt_logprobs))
        self.stats["prefill_calls"] += 1
        self.stats["prefill_seconds"] += time.perf_counter() - started
        ran = 0
        for i, s in enumerate(rows):
            step = min(c, len(s.prompt) - s.cursor)
            if scoring:
                s.scores.append(scores[i, : min(step, len(s.prompt) - 1 - s.cursor)])
            s.cursor += step
            ran += step
            self.ready[s.pages[: s.cursor // self.page_size]] = True
            if s.decoding:
                s.record(out.row(i, count[i]), stopped[i])
                self._finish_if_done(s, slots, staged, done)
        return ran

    def _state(self, rows: list[Slot | None], sampling: Rows, mode: Mode, **fields) -> DecodeState:
        """A program state over the pool for these slots (None: an idle row); `fields` as `DecodeState.start`."""
        cache = PagedKVCache(self.k, self.v, page_table(rows, self.table_width), self.block_pages, self.attention)
        return DecodeState.start(cache, sampling, mode=mode, **fields)

    def _finish_if_done(self, s: Slot, slots, staged, done) -> None:
        if not s.finished:
            return
        result = s.result()
        self._free(s, slots, staged)
        self.stats["generated_tokens"] += len(result.tokens)
        done.append((s.request, result))

    def _free(self, s: Slot, slots, staged) -> None:
        for page in s.pages:  # an unwritten page must not stay in the prefix cache
            if not self.ready[page] and self.pool.refs[page] == 1:
                self.pool.forget(page)
        self.pool.release(s.pages)
        if s in staged:
            staged.remove(s)
        else:
            slots[slots.index(s)] = None

    def _grow(self, slots, staged, waiting) -> None:
        """Give every decoding slot the pages of its next burst, preempting the latest admitted (staged or
        decoding) when dry."""
        for s in sorted((s for s in slots if s is not None), key=lambda s: s.order):
            if s not in slots:  # preempted meanwhile
                continue
            last_position = min(
                len(s.prompt) + s.count - 1 + self.burst - 1, len(s.prompt) + s.request.params.max_new_tokens - 2
            )
            while (need := self._pages_for(last_position + 1) - len(s.pages)) > 0:
                fresh = self.pool.allocate(need)
                if fresh is not None:
                    self.ready[fresh] = False
                    s.pages.extend(fresh)
                    break
                victim = max((v for v in [*slots, *staged] if v is not None), key=lambda v: v.order)
                self._free(victim, slots, staged)
                waiting.appendleft(victim.request)
                self.stats["preemptions"] += 1
                if victim is s:
                    break

    def _decode_step(self, weights, slots, staged, waiting, done) -> None:
        """One burst per sampling mode among the decoding slots (one burst in all when they share one)."""
        self._grow(slots, staged, waiting)
        running = sorted((s for s in slots if s is not None), key=lambda s: s.order)
        for mode in dict.fromkeys(s.mode for s in running):
            self._burst(weights, [s if s is not None and s.mode == mode else None for s in slots], mode)
            for s in running:
                if s.mode == mode:
                    self._finish_if_done(s, slots, staged, done)

    def _masks(self, matchers: list[constrain.Matcher | None]) -> np.ndarray | None:
        """The rows' next-token masks (`constrain`), None when no row is constrained."""
        if all(m is None for m in matchers):
            return None
        started = time.perf_counter()
        mask = self.grammars.masks(matchers)
        self.stats["grammar_seconds"] += time.perf_counter() - started
        return mask

    def _burst(self, weights: Weights, rows: list[Slot | None], mode: Mode) -> None:
        b = self.slots
        last, count, position, limit = (np.zeros(b, np.int32) for _ in range(4))
        live, seeds = np.zeros(b, bool), np.zeros(b, np.uint32)
        knobs = rows_of([s.knobs if s else NEUTRAL_KNOBS for s in rows], b)
        stops = rows_of([s.stops if s else NO_STOPS for s in rows], b)
        for i, s in enumerate(rows):
            if s is not None:
                last[i], count[i], limit[i] = s.last, s.count, s.request.params.max_new_tokens
                position[i], live[i], seeds[i] = len(s.prompt) + s.count - 1, True, s.request.params.seed
        sampling = Rows(seeds, np.zeros(b, np.int32), knobs, stops)
        state = self._state(
            rows, sampling, mode, n_out=self.burst, last=last, positions=position, count=count, limit=limit, live=live
        )
        started = time.perf_counter()
        until = np.int32(self.burst)
        matchers = [s.matcher if s else None for s in rows]
        if any(matchers):  # one step at a time, each under the rows' masks
            forward = functools.partial(decoding.forward, weights)
            state = constrain.decode_steps(forward, decoding.pick, state, matchers, self._masks, until)
        else:
            state = decoding.decode(weights, state, until)
        self.k, self.v = state.cache.k, state.cache.v
        out, new_count, stopped = generation.to_host((state.out, state.count, state.stopped))
        self.stats["decode_calls"] += 1
        self.stats["decode_seconds"] += time.perf_counter() - started
        for i, s in enumerate(rows):
            if s is not None:
                s.record(out.row(i, new_count[i] - count[i]), stopped[i])

"""The engine's running requests, host side: a `Slot` per admitted request, and the host arrays a
program call over slots reads (the page table, the rows' knobs and stop ids).

A slot holds what the scheduler (`llama_jax.inference.engine`) needs between calls: its pages, how
much of its prompt is in the cache, its tokens so far and, for a constrained request, its grammar
state. Nothing here touches the device or the page pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.inference import constrain, generation
from llama_jax.inference.decoding import Prompt, Rows
from llama_jax.inference.generation import MAX_STOP_TOKENS, GenerationResult, Outputs
from llama_jax.inference.sampling import Mode, SamplingParams
from llama_jax.model.paged_cache import NULL_PAGE

__all__ = ["NEUTRAL_KNOBS", "NO_STOPS", "Slot", "page_table", "prefill_arrays", "rows_of"]


@dataclasses.dataclass(eq=False)  # a running request is itself: `in`, `index`, `remove` by identity
class Slot:
    """A running request, host side."""

    request: Any  # the engine's `Request`: its id, prompt and `SamplingParams`
    order: int  # admission order (preemption takes the latest)
    mode: Mode  # the compiled program its rows run in
    knobs: np.ndarray  # [3] float32: temperature, top_p, min_p
    stops: np.ndarray  # [MAX_STOP_TOKENS] int32, -1 padded
    prompt: np.ndarray
    pages: list[int]
    hashes: list[bytes]  # of the prompt's shareable blocks
    cursor: int  # prompt tokens in the cache
    matcher: constrain.Matcher | None = None  # a constrained request's grammar state
    stopped: bool = False  # the last token is a stop token
    count: int = 0  # tokens sampled
    last: int = 0  # the last of them
    out: list[Outputs] = dataclasses.field(default_factory=list)  # their host outputs, piece by piece
    scores: list[np.ndarray] = dataclasses.field(default_factory=list)  # prompt log-probs, chunk by chunk

    @property
    def decoding(self) -> bool:
        return self.cursor == len(self.prompt)

    @property
    def finished(self) -> bool:
        """A stop token was sampled, or `max_new_tokens` were."""
        return self.stopped or self.count >= self.request.params.max_new_tokens

    def record(self, piece: Outputs, stopped) -> None:
        """Add the host outputs of the slot's newest tokens (`piece`: one row, its tokens in order), and
        advance a constrained request's grammar over them."""
        if len(piece.tokens):
            self.out.append(piece)
            self.count += len(piece.tokens)
            self.last = int(piece.tokens[-1])
        self.stopped = bool(stopped)
        if self.matcher is not None:
            self.matcher.take(self.count, self.last)

    def result(self) -> GenerationResult:
        """The finished request's result: its tokens (and log-probs), prompt log-probs if asked for."""
        out = generation.concat(self.out) if self.out else Outputs.empty(1, 0, self.mode).row(0, 0)  # max_new_tokens=0
        prompt_scores = np.concatenate(self.scores) if self.request.params.prompt_logprobs else None
        return generation.result(out, self.stopped, self.mode, prompt_scores)


def page_table(slots: Sequence[Slot | None], width: int) -> np.ndarray:
    """The slots' page tables `[len(slots), width]`, the null page past their pages and on idle rows (None)."""
    table = np.full((len(slots), width), NULL_PAGE, np.int32)
    for row, slot in enumerate(slots):
        if slot is not None:
            table[row, : len(slot.pages)] = slot.pages
    return table


def prefill_arrays(rows: Sequence[Slot], r: int, c: int, scoring: bool) -> tuple[Prompt, Rows, np.ndarray, np.ndarray]:
    """The host arrays of a prefill call running the next (up to) `c` prompt tokens of each of `rows`, in
    `r` rows (those past `rows` idle): → (the `Prompt`, its targets only when `scoring`; the rows'
    sampling `Rows`; limit `[r]`, each row's `max_new_tokens`; live `[r]`, the rows that sample a token)."""
    tokens = np.zeros((r, c), np.int32)
    start, last, limit, seeds = *(np.zeros(r, np.int32) for _ in range(3)), np.zeros(r, np.uint32)
    ends = np.zeros(r, bool)  # the row's prompt ends in this chunk: it samples its first token
    knobs, stops = rows_of([s.knobs for s in rows], r), rows_of([s.stops for s in rows], r)
    targets = np.full((r, c), -1, np.int32)  # position j scores the prompt token after it
    for i, s in enumerate(rows):
        chunk = s.prompt[s.cursor : s.cursor + c]
        tokens[i, : len(chunk)] = chunk
        start[i], last[i], seeds[i] = s.cursor, len(chunk) - 1, s.request.params.seed
        limit[i], ends[i] = s.request.params.max_new_tokens, s.cursor + len(chunk) == len(s.prompt)
        after = s.prompt[s.cursor + 1 : s.cursor + c + 1]
        targets[i, : len(after)] = after
    prompt = Prompt(tokens, last, start, targets if scoring else None)
    return prompt, Rows(seeds, np.zeros(r, np.int32), knobs, stops), limit, ends & (limit > 0)


NEUTRAL_KNOBS = SamplingParams(max_new_tokens=1).knobs()  # an idle row's (its tokens are dropped)
NO_STOPS = np.full(MAX_STOP_TOKENS, -1, np.int32)


def rows_of(values: list[np.ndarray], n: int) -> np.ndarray:
    """`values` stacked and padded to n rows with copies of the first (rows nobody reads)."""
    return np.stack(values + [values[0]] * (n - len(values)))

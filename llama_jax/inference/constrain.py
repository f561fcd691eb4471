"""Constrained decoding: a request's JSON schema, regular expression or choice of strings, token by token.

    grammars = Grammars.of(tokenizer, vocab_size)   # the vocabulary's token trie, built once per tokenizer
    matcher = grammars.matcher(params, stops)       # None: unconstrained; ValueError naming field and reason
    mask_bw = grammars.masks([matcher, None, ...])  # [B, W] int32, W = ceil(V / 32): bit v of row b set
                                                    # when token v may come next (unconstrained rows all ones)
    matcher.consume(token)                          # the token the device drew under that mask

The grammar work is llguidance's (`benchmarks/constrained.py` measured it against outlines-core on the
Llama 3 vocabulary: docs/INFERENCE.md has the numbers and the reason). It runs on the host; the mask
reaches the device as a packed bitmask and `apply_mask` sets the disallowed logits to -inf inside the
jitted step, before the sampling filters, so a constrained row samples from the model's distribution
restricted to the tokens that keep the output valid (greedy: the argmax over them). The logprobs a
request records stay those of the model's own distribution.

A grammar's end is a stop token: where llguidance allows its end-of-sequence, the mask allows the
row's own stop ids (`stop_tokens`) instead, so a request ends the way an unconstrained one does. A
row that reaches `max_new_tokens` first is cut where it stands, as in vLLM and sglang.

A mask holds for one token, so a constrained decode runs one step at a time, in two programs
(`decoding.forward`, `decoding.pick`; `decode_steps`): the host dispatches the step's model half,
advances the matchers and fills their masks while the device runs it, then dispatches the sampling
half under those masks. The rows are filled one after the other: llguidance's thread pool
(`fill_next_token_bitmask_par`) was many times slower for a batch of 32 on a busy 2-core host
(`benchmarks/constrained.py`).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from llama_jax.inference.sampling import SamplingParams

__all__ = ["Grammars", "Matcher", "apply_mask", "mask_width"]

# Grammars per tokenizer (weak: they go with it): building llguidance's token trie takes a while.
_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mask_width(vocab_size: int) -> int:
    """W: int32 words per row of a packed bitmask over `vocab_size` tokens."""
    return -(-vocab_size // 32)


def apply_mask(logits_bv, mask_bw):
    """`logits_bv [B, V]` with every token whose bit is clear in `mask_bw [B, W]` int32 at -inf."""
    v = logits_bv.shape[-1]
    bits_bw32 = (mask_bw[:, :, None] >> jnp.arange(32, dtype=jnp.int32)[None, None, :]) & 1
    allowed_bv = bits_bw32.reshape(mask_bw.shape[0], -1)[:, :v] == 1
    return jnp.where(allowed_bv, logits_bv, -jnp.inf)


# JSON as `json.dumps` writes it. Whitespace between tokens is llguidance's default, which a model may
# fill forever (an untrained one does); one layout bounds the output and keeps results comparable.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _grammar(field: str, value) -> str:
    """llguidance's grammar for a request's constraint (`SamplingParams.constraint`)."""
    from llguidance import LLMatcher

    if field == "json_schema":
        return LLMatcher.grammar_from_json_schema(json.loads(value), overrides=_JSON_LAYOUT)
    if field == "regex":
        return LLMatcher.grammar_from_regex(value)
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))


class Matcher:
    """One row's grammar state: which tokens may come next, advanced by the tokens drawn."""

    def __init__(self, matcher, stops: np.ndarray, eos: int) -> None:
        self.llm = matcher
        self.stops = stops  # the row's stop ids: the tokens that end it where the grammar may end
        self.eos = eos
        self.taken = 0  # tokens of the row seen so far (its count)

    def take(self, count: int, last: int) -> None:
        """The row after a step: `count` tokens drawn, the last one `last`. A new token that is not a stop
        id advances the grammar (one new token per step while a mask is set)."""
        if count > self.taken:
            self.taken = int(count)
            if int(last) not in self.stops and not self.llm.consume_token(int(last)):
                raise RuntimeError(
                    f"constrained decoding drew token {last}, which its grammar refuses: {self.llm.get_error()}"
                )


class Grammars:
    """Compiles requests' constraints against one tokenizer's vocabulary and fills their masks."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        from llguidance.tiktoken import lltokenizer_from_encoding

        model = getattr(tokenizer, "_model", None)
        if not hasattr(model, "_mergeable_ranks"):
            raise ValueError(
                f"constrained decoding needs a Llama 3 (tiktoken) tokenizer, got {type(tokenizer).__name__}"
            )
        self.eos = tokenizer.eot_id  # llguidance's end of sequence; replaced by each row's stop ids
        self.vocab_size = vocab_size
        self.llm = lltokenizer_from_encoding(model, n_vocab=vocab_size, eos_token=self.eos)
        self._matcher_type = llguidance.LLMatcher
        self._compiled: dict[tuple, str] = {}

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> Grammars:
        """The tokenizer's `Grammars` over `vocab_size` tokens, built on first use and kept with it."""
        per_size = _GRAMMARS.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = cls(tokenizer, vocab_size)
        return per_size[vocab_size]

    def matcher(self, params: SamplingParams, stops: np.ndarray) -> Matcher | None:
        """A fresh grammar state for the request (None: it has no constraint). `stops`: its stop ids, -1
        padded. A ValueError names the field and the reason when the constraint does not compile."""
        constraint = params.constraint
        if constraint is None:
            return None
        field, value = constraint
        stops = np.asarray([t for t in np.asarray(stops).ravel() if t >= 0], np.int32)
        if not len(stops):
            raise ValueError(f"{field}: a constrained request needs a stop token to end on; stop_tokens is empty")
        if constraint not in self._compiled:
            try:
                self._compiled[constraint] = _grammar(field, value)
            except (ValueError, RuntimeError, TypeError) as e:
                raise ValueError(f"{field}: cannot compile: {e}") from None
        matcher = self._matcher_type(self.llm, self._compiled[constraint], log_level=0)
        if matcher.is_error():
            raise ValueError(f"{field}: cannot compile: {matcher.get_error()}")
        return Matcher(matcher, stops, self.eos)

    def masks(self, matchers: Sequence[Matcher | None]) -> np.ndarray:
        """The rows' next-token bitmask `[B, W]` int32 (`mask_width`); all ones for a None row."""
        from llguidance.numpy import fill_next_token_bitmask

        mask_bw = np.full((len(matchers), mask_width(self.vocab_size)), -1, np.int32)
        bits = mask_bw.view(np.uint32)
        for b, m in enumerate(matchers):
            if m is None:
                continue
            fill_next_token_bitmask(m.llm, mask_bw, b)
            may_end = bits[b, m.eos // 32] >> np.uint32(m.eos % 32) & 1
            bits[b, m.eos // 32] &= ~np.uint32(1 << (m.eos % 32))
            if may_end:
                for t in m.stops:
                    bits[b, t // 32] |= np.uint32(1 << (t % 32))
        return mask_bw


def decode_steps(forward, pick, state, matchers: Sequence[Matcher | None], masks, until):
    """Decode `state` (a `decoding.DecodeState`) to output slot `until`, one step at a time:
    `forward(state) -> (state, logits)` is dispatched, and while the device runs it the host advances
    each row's grammar by its newest token (`take`) and fills `masks(matchers)`; then
    `pick(state, logits, mask)` draws the step's tokens. Returns once no row is live or the step is
    `until`, grammars caught up."""
    from llama_jax.inference.generation import to_host

    while True:
        count, last, live, step = to_host((state.count, state.last, state.live, state.step))
        if not live.any() or step >= until:
            take(matchers, count, last)
            return state
        state, logits = forward(state)  # asynchronous: the model runs while the host does the grammars
        take(matchers, count, last)
        state = pick(state, logits, masks(matchers))


def take(matchers: Sequence[Matcher | None], count_b, last_b) -> None:
    """`Matcher.take` for each constrained row, from a step's `count` and `last` (host arrays)."""
    for m, count, last in zip(matchers, count_b, last_b, strict=False):
        if m is not None:
            m.take(count, last)

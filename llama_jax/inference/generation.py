"""What a generation request is checked against, what it produces per token, and what it returns.

`generate`, `stream` (`llama_jax.inference.sampler`) and the engine (`llama_jax.inference.engine`) share these, so a
request means the same and gives the same result whichever runs it:

    check_prompt(prompt, ...)   one request check: token ids, vocabulary, context (before any work)
    stop_ids(model, tokens)     the stop-token rule: what `stop_tokens=None` means, padded for the programs
    Outputs                     the per-token outputs the jitted programs record on device
    to_host(tree)               the one host transfer (all-gathered across processes)
    result(row, stopped, mode)  the one `GenerationResult` builder, from a row of host `Outputs`

A new per-token output is a field of `Outputs` (its empty shape in `Outputs.empty`, written in
`Outputs.record`, computed by `decoding._pick`) and read in `result`: the programs, the engine's
per-request pieces and the transfers carry `Outputs` whole, so nothing else changes. Prompt log-probs
are per prompt token, not per output slot: the prefill that asked for them (`decoding.Prompt.targets`)
leaves them in `DecodeState.prompt_logprobs`, and `result` takes a row's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from llama_jax.inference.sampling import Mode
from llama_jax.model.config import LLAMA3_VOCAB_SIZE

__all__ = [
    "LLAMA3_STOP_TOKENS",
    "MAX_STOP_TOKENS",
    "GenerationResult",
    "Outputs",
    "check_can_generate",
    "check_prompt",
    "concat",
    "default_stop_tokens",
    "result",
    "stop_ids",
    "to_host",
]

# <|end_of_text|>, <|eom_id|>, <|eot_id|> (llama-models `llama3/generation.py`, its stop tokens).
LLAMA3_STOP_TOKENS = (128_001, 128_008, 128_009)
# Stop ids are passed as a fixed-size array (padded with -1) so a new stop set is not a new program.
MAX_STOP_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What one prompt produced.

    tokens: the new tokens, the stop token excluded.
    stop_reason: "stop" (a stop token was sampled) or "length" (`max_new_tokens` reached).
    stop_token: the stop token sampled (eot vs eom matters to chat), None for "length".
    logprobs: float32 log-prob of each token of `tokens`, when asked: the log-softmax of the model's
      logits (`logprobs_mode="raw"`), or of the processed logits it was drawn from ("processed":
      tempered, filtered tokens at -inf).
    top_logprobs: with `top_logprobs=K`, `(ids, logprobs)`: for each token of `tokens` and for the
      stop token when stop_reason == "stop", the K most likely ids (most likely first) and their
      float32 log-probs under the same distribution as `logprobs`.
    prompt_logprobs: with `prompt_logprobs=True`, one entry per prompt token, as vLLM gives them: None
      for the first (nothing precedes it), then each token's float32 log-prob given the tokens before it,
      under the same distribution as `logprobs`.
    """

    tokens: tuple[int, ...]
    stop_reason: str
    stop_token: int | None = None
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]] | None = None
    prompt_logprobs: tuple[float | None, ...] | None = None


# ---- the request check and the stop-token rule ---------------------------------------------------------


def check_can_generate(model) -> None:
    """A model with a sequence-classification head instead of an LM head cannot generate."""
    if getattr(model, "score", None) is not None:
        raise ValueError(
            f"this model has a sequence-classification head (score [D, {model.score.shape[1]}]) instead of an LM "
            "head: it scores sequences (llama_jax.jobs.rejection.reward_scorer) and cannot generate"
        )


def check_prompt(prompt, name: str, vocab_size: int, max_len: int, max_new_tokens: int) -> np.ndarray:
    """The prompt as int32 token ids, or a ValueError naming it (`name`, e.g. "prompt 2"): flat, non-empty,
    integer, inside the vocabulary, and with `max_new_tokens` within `max_len` positions."""
    ids = np.asarray(prompt)
    if ids.ndim != 1:
        raise ValueError(f"{name}: expected a flat list of token ids, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError(f"{name} is empty; expected at least one token (e.g. the BOS id 128000)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name}: token id {int(ids[j])} at position {j} is outside the vocabulary [0, {vocab_size})")
    if ids.size + max_new_tokens > max_len:
        raise ValueError(
            f"{name} has {ids.size} tokens; with max_new_tokens={max_new_tokens} it needs "
            f"{ids.size + max_new_tokens} positions, beyond the context of {max_len}: prompt too long "
            "(shorten the prompt or lower max_new_tokens)"
        )
    return ids.astype(np.int32)


def default_stop_tokens(model) -> tuple[int, ...]:
    """What `stop_tokens=None` means: Llama 3's (<|end_of_text|>, <|eom_id|>, <|eot_id|>) for a Llama 3
    vocabulary, else none (pass a Llama 2 tokenizer's `stop_tokens` explicitly)."""
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


# ---- the per-token outputs, their transfer, the result --------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Outputs:
    """Per-token outputs of B rows over N output slots (on device in the programs; numpy on the host)."""

    tokens: jax.Array  # [B, N] int32: the sampled tokens, -1 where a row sampled none
    logprobs: jax.Array  # [B, N] float32 ([B, 0] when the mode does not ask for them)
    top_ids: jax.Array  # [B, N, K] int32: the K most likely ids ([B, 0, 0] when K = 0)
    top_logprobs: jax.Array  # [B, N, K] float32: their log-softmax

    @classmethod
    def empty(cls, b: int, n: int, mode: Mode) -> Outputs:
        k = mode.top_logprobs
        return cls(
            tokens=np.full((b, n), -1, np.int32),
            logprobs=np.zeros((b, n if mode.logprobs else 0), np.float32),
            top_ids=np.zeros((b, n if k else 0, k), np.int32),
            top_logprobs=np.zeros((b, n if k else 0, k), np.float32),
        )

    def record(self, step: jax.Array, new: Outputs) -> Outputs:
        """`new` (one column: fields `[B, ...]`) written at output slot `step`; absent fields stay absent."""

        def put(buf, x):
            return jax.lax.dynamic_update_index_in_dim(buf, x.astype(buf.dtype), step, axis=1) if buf.shape[1] else buf

        return jax.tree.map(put, self, new)

    def row(self, i: int, n: int) -> Outputs:
        """Row i's first n slots (host arrays), the absent fields kept empty."""
        return jax.tree.map(lambda x: x[i, :n] if x.shape[1] else x[i], self)


def to_host(tree):
    """Fetch device results to this host. On several processes an array spanning devices this process
    cannot address is all-gathered first (every process gets every row, and schedules from the same values)."""
    leaves = jax.tree.leaves(tree)
    if all(x.is_fully_addressable for x in leaves if isinstance(x, jax.Array)):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        return jax.device_get(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)


def concat(pieces: Sequence[Outputs]) -> Outputs:
    """Host `Outputs` rows (`Outputs.row`) one after the other."""
    return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


def result(row: Outputs, stopped: bool, mode: Mode, prompt_scores: np.ndarray | None = None) -> GenerationResult:
    """The `GenerationResult` of one row's host outputs: every token it sampled, the stop token last when
    `stopped`; `prompt_scores`: the log-probs of prompt tokens 1.. (`DecodeState.prompt_logprobs` of the
    row, trimmed to its prompt), when asked."""
    n = len(row.tokens) - bool(stopped)
    top = None
    if mode.top_logprobs:  # the stop token's distribution too
        top = (
            tuple(tuple(int(i) for i in ids) for ids in row.top_ids),
            tuple(tuple(float(x) for x in lps) for lps in row.top_logprobs),
        )
    return GenerationResult(
        tokens=tuple(int(t) for t in row.tokens[:n]),
        stop_reason="stop" if stopped else "length",
        stop_token=int(row.tokens[n]) if stopped else None,
        logprobs=tuple(float(x) for x in row.logprobs[:n]) if mode.logprobs else None,
        top_logprobs=top,
        prompt_logprobs=None if prompt_scores is None else (None, *(float(x) for x in prompt_scores)),
    )

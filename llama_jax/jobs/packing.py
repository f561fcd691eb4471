"""Documents into fixed-length training rows: the alignment every data source shares.

A `Document` is one tokenized dialog, text or record, position-aligned: position t holds the input
`tokens[t]` and the token that follows it in the same document, `targets[t]`. A document of n tokens
takes n positions. The target of its last token is 0 with loss 0, because nothing follows it. Where
a row cuts a document (a truncated dialog or record, or a text document continued in the next row),
the target at the cut is still the document's next token, so no target is lost at a cut.

Rows hold one document each (`one_per_row`: cut at T, dropped if nothing trained is left) or several
(`pack`); `assemble` writes them into an `Examples`, each document its own segment:

    tokens      <bos>  Hello  world  <eos>  <bos>   Hi   <eos>  <pad>
    targets     Hello  world  <eos>    0     Hi   <eos>    0      0
    loss_mask     1      1      1      0      1     1     0      0
    positions     0      1      2      3      0     1     2      0
    segment_ids   1      1      1      1      2     2     2      0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.text.tokenizer import Tokenizer

__all__ = [
    "ROW_DTYPES",
    "Document",
    "Examples",
    "assemble",
    "check_seq_len",
    "document",
    "one_per_row",
    "pack",
    "padding_id",
]

# The arrays of a row, and their dtypes; distillation adds the teacher's [..., K] arrays.
ROW_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "positions": np.int32,
    "segment_ids": np.int32,
}
_ARRAY_DTYPES = {**ROW_DTYPES, "teacher_ids": np.int32, "teacher_logprobs": np.float32}


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """A tokenized dataset in host memory; every array [N, T] (T = seq_len).

    Attributes:
      tokens: int32 model inputs; the pad id where nothing.
      targets: int32 next-token targets within the same document; 0 where none.
      loss_mask: float32, 1 where the target is trained on, else 0.
      positions: int32 rotary positions, restarting at 0 at each segment.
      segment_ids: int32, 0 = padding, 1, 2, ... = document (piece) within the row; attention must
        stay within a segment.
      teacher_ids, teacher_logprobs: [N, T, K] int32 / float32, the teacher's top-K ids and
        log-probabilities for `targets[:, t]` (distillation); 0 where `loss_mask` is 0.
      n_documents: dialogs / texts / records given.
      n_truncated: dialogs or records longer than a row, kept cut at T.
      n_dropped: dialogs or records left out because no trained target remained (no assistant
        message or completion, or everything trained lay beyond T).
      n_continued: text documents longer than the space left for them, continued in the next row.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    teacher_ids: np.ndarray | None = None
    teacher_logprobs: np.ndarray | None = None
    n_documents: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_continued: int = 0

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        if len(shape) != 2:
            raise ValueError(f"tokens: expected [N, T], got shape {shape}")
        if (self.teacher_ids is None) != (self.teacher_logprobs is None):
            raise ValueError("teacher_ids and teacher_logprobs go together: give both or neither")
        k = () if self.teacher_ids is None else self.teacher_ids.shape[-1:]
        for name, dtype in _ARRAY_DTYPES.items():
            if (value := getattr(self, name)) is not None:
                _check_array(value, name, shape + k if name.startswith("teacher") else shape, dtype)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The per-row arrays that are present, by field name: what a `Loader` batch holds."""
        return {name: value for name in _ARRAY_DTYPES if (value := getattr(self, name)) is not None}


def _check_array(value: Any, name: str, shape: tuple[int, ...], dtype: type) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != dtype or value.shape != shape:
        found = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
        raise ValueError(f"{name}: expected {np.dtype(dtype)} array of shape {shape}, got {found}")


# ----------------------------------------------------------------------------------------------
# Documents and rows


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: inputs, targets and loss mask [n]; teacher top-K [n, K] for distillation."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    teacher_ids: np.ndarray | None = None
    teacher_logprobs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def cut(self, start: int, stop: int) -> Document:
        """Positions [start, stop); the target at `stop - 1` stays the document's next token."""
        return Document(*(None if a is None else a[start:stop] for a in dataclasses.astuple(self)))


def document(
    ids: Sequence[int], trained: Sequence[bool], teacher: tuple[np.ndarray, np.ndarray] | None = None
) -> Document:
    """Document of token ids [n] where `trained[i]` says whether predicting `ids[i]` is trained on."""
    ids = np.asarray(ids, np.int32)
    targets = np.append(ids[1:], np.int32(0))
    loss_mask = np.append(np.asarray(trained[1:], np.float32), np.float32(0))
    return Document(ids, targets, loss_mask, *(teacher or (None, None)))


def assemble(rows: list[list[Document]], seq_len: int, pad_id: int, k: int | None, **stats: int) -> Examples:
    """Rows of documents -> `Examples` [len(rows), seq_len]; each document is one segment."""
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    targets = np.zeros((n, seq_len), np.int32)
    loss_mask = np.zeros((n, seq_len), np.float32)
    positions = np.zeros((n, seq_len), np.int32)
    segment_ids = np.zeros((n, seq_len), np.int32)
    teacher_ids = None if k is None else np.zeros((n, seq_len, k), np.int32)
    teacher_logprobs = None if k is None else np.zeros((n, seq_len, k), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for segment, doc in enumerate(row, start=1):
            span = slice(start, start + len(doc))
            tokens[r, span] = doc.tokens
            targets[r, span] = doc.targets
            loss_mask[r, span] = doc.loss_mask
            positions[r, span] = np.arange(len(doc))
            segment_ids[r, span] = segment
            if k is not None:
                teacher_ids[r, span] = doc.teacher_ids
                teacher_logprobs[r, span] = doc.teacher_logprobs
            start += len(doc)
        assert start <= seq_len, (start, seq_len)
    return Examples(tokens, targets, loss_mask, positions, segment_ids, teacher_ids, teacher_logprobs, **stats)


def one_per_row(docs: list[Document], seq_len: int, pad_id: int, k: int | None) -> Examples:
    """One document per row: longer ones cut at `seq_len`, those left with no trained target dropped."""
    rows, truncated, dropped = [], 0, 0
    for doc in docs:
        kept = doc.cut(0, seq_len)
        if not kept.loss_mask.any():
            dropped += 1
            continue
        truncated += len(doc) > seq_len
        rows.append([kept])
    return assemble(rows, seq_len, pad_id, k, n_documents=len(docs), n_truncated=truncated, n_dropped=dropped)


def pack(docs: list[Document], seq_len: int) -> tuple[list[list[Document]], int]:
    """Next-fit packing in order. A document that fits in a row is never split: if it does not fit in
    the space left, a new row starts. A longer one fills the space left and continues in the next rows.
    Returns the rows and how many documents were continued."""
    rows: list[list[Document]] = []
    row: list[Document] = []
    free, continued = seq_len, 0
    for doc in docs:
        if free < len(doc) <= seq_len:
            rows.append(row)
            row, free = [], seq_len
        continued += len(doc) > free
        start = 0
        while start < len(doc):
            if free == 0:
                rows.append(row)
                row, free = [], seq_len
            piece = doc.cut(start, start + free)
            row.append(piece)
            free -= len(piece)
            start += len(piece)
    if row:
        rows.append(row)
    return rows, continued


def check_seq_len(seq_len: int) -> None:
    """A row length must be a positive int (not a bool, which Python counts as one)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")


def padding_id(tokenizer: Tokenizer) -> int:
    """The id that fills a row's unused positions."""
    # Llama 2's sentencepiece model has no pad id (-1); any valid id does, since segment 0 is never attended.
    return tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id

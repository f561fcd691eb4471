"""Fine-tuning data: chat dialogs, raw text and teacher top-K records as fixed-length rows of token ids.

Every source becomes an `Examples`: numpy arrays [N, T] in host memory (N rows, T = seq_len), which a
`Loader` cuts into deterministic, resumable batches. The alignment of a row (targets = the next token
of the same document, segments, positions) is the same for every source; `llama_jax.jobs.packing` lays it
out and shows it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llama_jax.jobs.packing import Document, Examples, assemble, check_seq_len, document, one_per_row, pack, padding_id
from llama_jax.text.chat import ChatFormat
from llama_jax.text.tokenizer import Tokenizer
from llama_jax.text.tools import ToolFormat

__all__ = [
    "Examples",
    "Loader",
    "chat_examples",
    "distill_examples",
    "load_examples",
    "numbered_records",
    "read_jsonl",
    "text_examples",
]

Kind = Literal["auto", "chat", "text", "distill"]

# `<|finetune_right_pad_id|>`: Llama 3's padding id; records of the batch job carry no tokenizer.
LLAMA3_PAD_ID = 128004
# The key that marks each kind of JSONL record.
_KIND_KEYS = {"chat": "messages", "text": "text", "distill": "top_logprobs"}
_INT32_MAX = np.iinfo(np.int32).max


# ----------------------------------------------------------------------------------------------
# Chat dialogs


def chat_examples(
    dialogs: Iterable[Sequence[Mapping[str, Any]] | Mapping[str, Any]],
    chat: ChatFormat,
    seq_len: int,
    *,
    tool_format: ToolFormat = "json",
) -> Examples:
    """One dialog per row (padded, not packed), trained on what the assistant says.

    A dialog is a list of message dicts (see `llama_jax.text.chat`) or a `{"messages": [...]}` record. Its
    tokens are exactly `chat.encode_dialog(messages)` without the assistant header that method adds
    for generation: bos, then each message's header, body and end token. `loss_mask` is 1 on the
    targets that are an assistant message's body (text, `<|python_tag|>` and tool calls as
    `ChatFormat` renders them) and its end token (`<|eot_id|>` / `<|eom_id|>`); 0 on bos, every
    header, and system / user / tool (ipython) messages. This is Meta's llama-recipes
    `tokenize_dialog` except two of its quirks: it trains on the "\\n\\n" closing the assistant header
    and on tool results. Dialogs longer than `seq_len` are cut (`n_truncated`); dialogs left with
    no assistant target are dropped (`n_dropped`).
    """
    labelled = [(f"dialogs[{i}]", dialog) for i, dialog in enumerate(dialogs)]
    return _chat_examples(labelled, chat, seq_len, tool_format)


def _chat_examples(
    labelled: list[tuple[str, Any]], chat: ChatFormat, seq_len: int, tool_format: ToolFormat
) -> Examples:
    check_seq_len(seq_len)
    # The header is the same for every assistant message; check that each message starts with it.
    header = chat.encode_message({"role": "assistant", "content": ""}, tool_format=tool_format)[:-1]
    docs = [_chat_doc(dialog, chat, header, tool_format, where) for where, dialog in labelled]
    return one_per_row(docs, seq_len, padding_id(chat.tokenizer), None)


def _chat_doc(dialog: Any, chat: ChatFormat, header: list[int], tool_format: ToolFormat, where: str) -> Document:
    if isinstance(dialog, Mapping):
        if "messages" not in dialog:
            raise ValueError(
                f"{where}: expected a list of messages or a dict with 'messages', got keys {sorted(dialog)}"
            )
        dialog = dialog["messages"]
    if isinstance(dialog, str | bytes | Mapping) or not isinstance(dialog, Sequence):
        raise ValueError(f"{where}: expected a list of message dicts, got {type(dialog).__name__}")
    ids = [chat.tokenizer.bos_id]
    trained = [False]
    for i, message in enumerate(dialog):
        try:
            message_ids = chat.encode_message(message, tool_format=tool_format)
        except ValueError as err:
            raise ValueError(f"{where}: messages[{i}]: {err}") from err
        n_trained = 0
        if message["role"] == "assistant":
            if message_ids[: len(header)] != header:
                raise RuntimeError(f"{where}: messages[{i}]: assistant message does not start with the header {header}")
            n_trained = len(message_ids) - len(header)
        ids += message_ids
        trained += [False] * (len(message_ids) - n_trained) + [True] * n_trained
    return document(ids, trained)


# ----------------------------------------------------------------------------------------------
# Raw text


def text_examples(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int) -> Examples:
    """Raw text documents, each bos + text + eos (`<|end_of_text|>`), packed into rows of `seq_len`.

    Documents are placed in order. One that fits in a row is never split (a new row is started when
    it does not fit in the space left). One longer than the space left fills it and continues in the
    next rows (`n_continued`): each piece is its own segment with positions restarting at 0, so a
    continuation does not attend to the earlier pieces, but the target at each cut is the document's
    next token, so every token after bos is a target exactly once. Loss is on every real target.
    """
    return _text_examples([(f"texts[{i}]", text) for i, text in enumerate(texts)], tokenizer, seq_len)


def _text_examples(labelled: list[tuple[str, Any]], tokenizer: Tokenizer, seq_len: int) -> Examples:
    check_seq_len(seq_len)
    docs = []
    for where, text in labelled:
        if not isinstance(text, str):
            raise ValueError(f"{where}: expected str, got {type(text).__name__}")
        ids = tokenizer.encode(text, bos=True, eos=True)
        docs.append(document(ids, [True] * len(ids)))
    rows, continued = pack(docs, seq_len)
    return assemble(rows, seq_len, padding_id(tokenizer), None, n_documents=len(docs), n_continued=continued)


# ----------------------------------------------------------------------------------------------
# Distillation records (the batch job's output)


def distill_examples(records: Iterable[Mapping[str, Any]], seq_len: int, *, pad_id: int = LLAMA3_PAD_ID) -> Examples:
    """One batch-job record per row, trained on the completion against the teacher's top-K.

    A record holds `sequence` (prompt ids + generated ids [+ stop token]), `completion_start` (the
    number of prompt ids, at least 1) and `top_logprobs: {"ids": [[K ints]...], "logprobs": [[K
    floats]...]}` with one entry per token of `sequence[completion_start:]`: entry i is the teacher's
    distribution that `sequence[completion_start + i]` was drawn from. Since the target at position t
    is `sequence[t + 1]`, entry i lands at position `completion_start + i - 1`, where `loss_mask` is 1.
    Records longer than `seq_len` are cut (`n_truncated`); records with no completion target left are
    dropped (`n_dropped`). K must be the same in every record.
    """
    return _distill_examples([(f"records[{i}]", r) for i, r in enumerate(records)], seq_len, pad_id)


def _distill_examples(labelled: list[tuple[str, Any]], seq_len: int, pad_id: int) -> Examples:
    check_seq_len(seq_len)
    docs, k, k_where = [], None, None
    for where, record in labelled:
        doc = _distill_doc(record, where)
        doc_k = doc.teacher_ids.shape[1]
        if doc_k:  # a record without a completion has no teacher entries (K = 0)
            if k is None:
                k, k_where = doc_k, where
            elif doc_k != k:
                raise ValueError(f"{where}: top_logprobs has K = {doc_k} entries per token, but {k_where} has K = {k}")
        docs.append(doc)
    k = k or 0
    # Records without a completion carry K = 0; give them the common K (they are dropped anyway).
    docs = [d if d.teacher_ids.shape[1] == k else _with_k(d, k) for d in docs]
    return one_per_row(docs, seq_len, pad_id, k)


def _with_k(doc: Document, k: int) -> Document:
    teacher_ids, teacher_logprobs = _empty_teacher(len(doc), k)
    return dataclasses.replace(doc, teacher_ids=teacher_ids, teacher_logprobs=teacher_logprobs)


def _empty_teacher(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero teacher ids and log-probabilities [n, k]: the value wherever nothing is trained."""
    return np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)


def _distill_doc(record: Any, where: str) -> Document:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
    for key in ("sequence", "completion_start", "top_logprobs"):
        if key not in record:
            raise ValueError(f"{where}: missing '{key}'")
    sequence = _id_array(record["sequence"], f"{where}: sequence", ndim=1)
    start = record["completion_start"]
    if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start <= len(sequence):
        raise ValueError(
            f"{where}: completion_start: expected an int from 1 (the prompt holds at least bos) to "
            f"len(sequence) = {len(sequence)}, got {start!r}"
        )
    top = record["top_logprobs"]
    if not isinstance(top, Mapping) or not {"ids", "logprobs"} <= set(top):
        raise ValueError(f"{where}: top_logprobs: expected a dict with 'ids' and 'logprobs'")
    n_completion = len(sequence) - start
    for key in ("ids", "logprobs"):
        if not isinstance(top[key], list) or len(top[key]) != n_completion:
            found = len(top[key]) if isinstance(top[key], list) else type(top[key]).__name__
            raise ValueError(
                f"{where}: top_logprobs.{key}: expected a list of one entry per completion token "
                f"(len(sequence) - completion_start = {n_completion}), got {found}"
            )
    trained = [False] * start + [True] * n_completion
    if n_completion == 0:
        return document(sequence, trained, _empty_teacher(len(sequence), 0))
    ids = _id_array(top["ids"], f"{where}: top_logprobs.ids", ndim=2)
    logprobs = _logprob_array(top["logprobs"], f"{where}: top_logprobs.logprobs")
    if ids.shape != logprobs.shape or ids.shape[1] == 0:
        raise ValueError(f"{where}: top_logprobs: ids {ids.shape} and logprobs {logprobs.shape} must be [n, K], K >= 1")
    # Entry i predicts sequence[start + i], the target of position start + i - 1.
    teacher_ids, teacher_logprobs = _empty_teacher(len(sequence), ids.shape[1])
    teacher_ids[start - 1 : -1] = ids
    teacher_logprobs[start - 1 : -1] = logprobs
    return document(sequence, trained, (teacher_ids, teacher_logprobs))


def _id_array(value: Any, where: str, *, ndim: int) -> np.ndarray:
    """Token ids as int32, ndim 1 (a list of ints) or 2 (a list of equal-length lists of ints)."""
    expected = "a list of ints" if ndim == 1 else "a list of equal-length lists of ints"
    try:
        array = np.array(value)
    except ValueError as err:  # ragged
        raise ValueError(f"{where}: expected {expected} ({err})") from err
    if array.ndim != ndim or array.size == 0 or array.dtype.kind not in "iu":
        raise ValueError(f"{where}: expected {expected}, got {_describe(array)}")
    if array.min() < 0 or array.max() > _INT32_MAX:
        raise ValueError(f"{where}: token ids must lie in [0, 2**31), found {array.min()}..{array.max()}")
    return array.astype(np.int32)


def _logprob_array(value: Any, where: str) -> np.ndarray:
    try:
        array = np.array(value)
    except ValueError as err:
        raise ValueError(f"{where}: expected a list of equal-length lists of numbers ({err})") from err
    if array.ndim != 2 or array.dtype.kind not in "iuf":
        raise ValueError(f"{where}: expected a list of equal-length lists of numbers, got {_describe(array)}")
    array = array.astype(np.float32)
    if np.isnan(array).any() or (array > 1e-3).any():
        raise ValueError(f"{where}: log-probabilities must be <= 0 (or -inf) and not NaN")
    return array


def _describe(array: np.ndarray) -> str:
    return f"{array.ndim}-d {array.dtype.name} values of shape {array.shape}"


# ----------------------------------------------------------------------------------------------
# JSONL files


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per non-blank line.

    Raises ValueError naming `file:line` and what was wrong (not UTF-8, not JSON, not an object).
    """
    return [record for _, record in numbered_records(Path(path))]


def numbered_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """[("file:line", record)] for every non-blank line."""
    records = []
    with path.open("rb") as file:
        for lineno, raw in enumerate(file, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 ({err})") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON: {err.msg} at column {err.colno}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            records.append((where, record))
    return records


def load_examples(
    path: str | Path,
    *,
    tokenizer: Tokenizer | None,
    seq_len: int,
    kind: Kind = "auto",
    tool_format: ToolFormat = "json",
) -> Examples:
    """A JSONL file of one kind of record -> `Examples`.

    Kinds, by the key that marks them: `{"messages": [...]}` chat dialogs (`chat_examples`),
    `{"text": "..."}` raw text (`text_examples`), batch-job records with `"top_logprobs"`
    (`distill_examples`; `tokenizer` may then be None). `kind="auto"` takes the kind of the first
    record; any record of another kind, or otherwise bad, raises ValueError naming `file:line`.
    """
    path = Path(path)
    records = numbered_records(path)
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    if kind == "auto":
        kind = _kind_of(*records[0])
        decided = f"decided by {records[0][0]}"
    elif kind in _KIND_KEYS:
        decided = f"kind={kind!r}"
    else:
        raise ValueError(f"kind: expected 'auto' or one of {tuple(_KIND_KEYS)}, got {kind!r}")
    for where, record in records:
        if (found := _kind_of(where, record)) != kind:
            raise ValueError(f"{where}: a {found} record in a {kind} file ({decided})")
    labelled = [(where, record[_KIND_KEYS[kind]] if kind != "distill" else record) for where, record in records]
    if kind == "distill":
        return _distill_examples(labelled, seq_len, LLAMA3_PAD_ID if tokenizer is None else padding_id(tokenizer))
    if tokenizer is None:
        raise ValueError(f"{path}: {kind} records need a tokenizer")
    if kind == "chat":
        return _chat_examples(labelled, ChatFormat(tokenizer), seq_len, tool_format)
    return _text_examples(labelled, tokenizer, seq_len)


def _kind_of(where: str, record: Mapping[str, Any]) -> str:
    if _KIND_KEYS["distill"] in record:
        return "distill"  # a batch-job result: its "text" is the completion's text, not a document
    kinds = [kind for kind, key in _KIND_KEYS.items() if key in record]
    if len(kinds) != 1:
        raise ValueError(
            f"{where}: expected exactly one of 'messages' (chat), 'text' (raw text) or 'top_logprobs' "
            f"(distillation), found keys {sorted(record)}"
        )
    return kinds[0]


# ----------------------------------------------------------------------------------------------
# Batches


class Loader:
    """Deterministic batches: `batch(step)` depends only on (seed, step), so resuming = knowing the step.

    Epoch e visits the rows in the order `np.random.default_rng((seed, e)).permutation(N)` (or in
    order with `shuffle=False`), `batch_size` rows per step; the last N % batch_size rows of that
    order are left out of the epoch, a different remainder each epoch.
    """

    def __init__(self, examples: Examples, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
        self.examples = examples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.steps_per_epoch = len(examples) // self.batch_size
        self._arrays = examples.arrays
        self._order_cache: tuple[int, np.ndarray] | None = None

    def epoch(self, step: int) -> int:
        """The epoch that `step` (counted from 0 over the whole run) falls in."""
        if step < 0:
            raise ValueError(f"step: expected >= 0, got {step}")
        return step // self.steps_per_epoch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The rows of `step`: every present `Examples` array, [batch_size, T] or [batch_size, T, K]."""
        index = self.indices(step)
        return {name: array[index] for name, array in self._arrays.items()}

    def indices(self, step: int) -> np.ndarray:
        """Row numbers [batch_size] of `step`."""
        epoch = self.epoch(step)
        start = (step % self.steps_per_epoch) * self.batch_size
        return self._order(epoch)[start : start + self.batch_size]

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.examples)
            order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

"""Llama tokenizers: Llama 3's tiktoken BPE and Llama 2's sentencepiece, behind one interface.

`Tokenizer.from_file(path)` reads either `tokenizer.model` format and returns a tokenizer whose
`encode`/`decode` give the same ids as Meta's reference tokenizers (llama-models 0.3.0 for Llama 3,
the llama repository's sentencepiece wrapper for Llama 2). The BPE itself is tiktoken's; this module
only reproduces Meta's vocabulary layout, special tokens and input chunking around it.
"""

from __future__ import annotations

import abc
import base64
import binascii
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken

__all__ = ["TOKENIZER_PLACES", "Llama3Tokenizer", "SentencePieceTokenizer", "Tokenizer", "find_tokenizer"]

AllowedSpecial = Literal["all"] | Collection[str] | None
DisallowedSpecial = Literal["all"] | Collection[str]

# Meta's split regex (llama-models `llama3/tokenizer.py`); BPE merges never cross its pieces.
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Names as llama-models 0.3.0 defines them; HF names 128005 and 128011 differently (same ids).
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)

# tiktoken panics (pyo3) on very long inputs and on very long runs of one character class
# (tiktoken issue 195), so Meta encodes slices independently. These limits change the ids of
# pathological inputs, so they are part of the specification, not a tuning knob.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

# `\s` in Python's `re` is exactly `str.isspace` (both are Py_UNICODE_ISSPACE), which is what Meta's
# character-by-character scan uses; the regex finds the same runs without a Python-level loop.
_SAME_CLASS_RUN = re.compile(r"\s+|\S+")
_TIKTOKEN_FIRST_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")
# A sentencepiece ModelProto opens with field 1 (`pieces`), wire type 2: tag byte 0x0A.
_PROTOBUF_PIECES_TAG = b"\x0a"


class Tokenizer(abc.ABC):
    """What every Llama tokenizer offers; build one with `Tokenizer.from_file`.

    Attributes:
      special_tokens: control-token text -> id.
      bos_id, eos_id, pad_id: begin/end of text and padding ids (`pad_id` is -1 when the model has none).
      eot_id, eom_id, python_tag_id: Llama 3 chat tokens; None for tokenizers without them.
      stop_tokens: ids that end generation.
      n_words: vocabulary size including special tokens (Meta's name; `vocab_size` is an alias).
    """

    special_tokens: Mapping[str, int]
    bos_id: int
    eos_id: int
    pad_id: int
    eot_id: int | None
    eom_id: int | None
    python_tag_id: int | None
    stop_tokens: tuple[int, ...]
    n_words: int
    _model: Any  # tiktoken's Encoding or sentencepiece's processor: both decode a list of ids

    @property
    def vocab_size(self) -> int:
        return self.n_words

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a Llama 3 tiktoken or Llama 2 sentencepiece `tokenizer.model`, detecting which it is."""
        if path is None:  # what find_tokenizer returns for a checkpoint without one
            raise ValueError("no tokenizer path: the checkpoint holds no tokenizer.model (nor original/); pass one")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        data = path.read_bytes()
        if _TIKTOKEN_FIRST_LINE.fullmatch(data.split(b"\n", 1)[0]):
            return Llama3Tokenizer(_parse_tiktoken_ranks(data, path), name=path.name)
        if data.startswith(_PROTOBUF_PIECES_TAG):
            return SentencePieceTokenizer(data, source=path)
        raise ValueError(
            f"{path}: not a Llama tokenizer model; expected Llama 3 tiktoken BPE ranks "
            "('<base64 token> <rank>' per line) or a Llama 2 sentencepiece model (protobuf)"
        )

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: AllowedSpecial = None,
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Token ids of `s`, with bos prepended / eos appended only when asked."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        ids = self._encode(s, allowed_special, disallowed_special)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    @abc.abstractmethod
    def _encode(self, s: str, allowed_special: AllowedSpecial, disallowed_special: DisallowedSpecial) -> list[int]:
        """The ids of the text itself, special-token text handled as asked."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids decode to their own text."""
        return self._model.decode(list(ids))


class Llama3Tokenizer(Tokenizer):
    """Llama 3 / 3.1 / 3.2 tokenizer: tiktoken BPE over 128,000 ranks plus 256 special tokens.

    Special-token text typed by a user (for example "<|eot_id|>") is ordinary text by default, as in
    Meta's `encode`, so a user can never inject control tokens; pass `allowed_special="all"` to
    parse it, or `disallowed_special="all"` to reject it.
    """

    def __init__(self, mergeable_ranks: Mapping[bytes, int], *, name: str = "tokenizer.model") -> None:
        n_base = len(mergeable_ranks)
        reserved = (
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))
        )
        names = (*LLAMA3_NAMED_SPECIAL_TOKENS, *reserved)
        self.special_tokens = {token: n_base + i for i, token in enumerate(names)}
        self._model = tiktoken.Encoding(
            name=name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=dict(mergeable_ranks),
            special_tokens=self.special_tokens,
        )
        self.n_words = n_base + LLAMA3_NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = (self.eos_id, self.eom_id, self.eot_id)

    def _encode(self, s: str, allowed_special: AllowedSpecial, disallowed_special: DisallowedSpecial) -> list[int]:
        allowed = set() if allowed_special is None else allowed_special
        ids = []
        for piece in _meta_slices(s):
            ids += self._model.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special)
        return ids


class SentencePieceTokenizer(Tokenizer):
    """Llama 2 tokenizer: a sentencepiece model, with Meta's bos/eos flags and `stop_tokens = (eos,)`.

    Sentencepiece never reads control tokens from text, so only the default `allowed_special` /
    `disallowed_special` are accepted; anything else raises instead of being silently ignored.
    """

    def __init__(self, model_proto: bytes, *, source: str | Path = "<bytes>") -> None:
        import sentencepiece  # only Llama 2 checkpoints need it

        self._model = sentencepiece.SentencePieceProcessor()
        try:
            self._model.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises bare RuntimeError/OSError types
            raise ValueError(f"{source}: not a valid sentencepiece model ({err})") from err
        self.n_words = self._model.vocab_size()
        self.bos_id = self._model.bos_id()
        self.eos_id = self._model.eos_id()
        self.pad_id = self._model.pad_id()
        self.eot_id = self.eom_id = self.python_tag_id = None
        self.stop_tokens = (self.eos_id,)
        self.special_tokens = {
            self._model.id_to_piece(i): i
            for i in range(self.n_words)
            if self._model.is_control(i) or self._model.is_unknown(i)
        }

    def _encode(self, s: str, allowed_special: AllowedSpecial, disallowed_special: DisallowedSpecial) -> list[int]:
        if allowed_special or disallowed_special:
            raise ValueError(
                "sentencepiece tokenizers never parse special tokens from text; "
                "allowed_special/disallowed_special must be left at their defaults"
            )
        return list(self._model.encode(s))


# Where a checkpoint directory keeps its tokenizer.model, in the order looked at: beside the weights (Meta's
# download, every directory `convert` writes), then where Meta's files sit in a Hugging Face repository.
TOKENIZER_PLACES = ("tokenizer.model", "original/tokenizer.model")


def find_tokenizer(checkpoint_dir: str | Path) -> Path | None:
    """The `tokenizer.model` of a checkpoint directory, from the first of `TOKENIZER_PLACES` that holds one."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise NotADirectoryError(f"checkpoint directory not found: {checkpoint_dir}")
    for place in TOKENIZER_PLACES:
        if (checkpoint_dir / place).is_file():
            return checkpoint_dir / place
    return None


def _meta_slices(s: str) -> Iterator[str]:
    """The substrings Meta's Llama 3 `encode` hands to tiktoken one at a time (may yield "")."""
    for start in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from split_long_runs(s[start : start + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)


def split_long_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars.

    Same pieces as Meta's `_split_whitespaces_or_nonwhitespaces`: a run longer than `max_run` is cut
    every `max_run` characters from its start, and a cut keeps everything since the previous cut
    (shorter runs of the other class included) in the earlier piece. Always yields at least one piece.
    """
    start = 0
    for run in _SAME_CLASS_RUN.finditer(s):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield s[start:cut]
            start = cut
    yield s[start:]


def _parse_tiktoken_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    """`<base64 token> <rank>` lines -> {token bytes: rank}; ranks must be exactly 0..n-1.

    Meta's reader logs and skips malformed lines; a corrupt file would then shift every special-token
    id, so here any malformed line is an error naming the file and line.
    """
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank_text = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank_text)
        except (ValueError, binascii.Error) as err:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', found {line[:60]!r} ({err})") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks must be unique and cover 0..{len(ranks) - 1} without gaps")
    return ranks

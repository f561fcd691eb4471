"""The batch job's files: request lines in (parsed and validated, each error naming its line and
field), results out (repaired and indexed on open, whole-line appends, input order at the end).

`Reader` yields, for every input line, a `JobRequest`, a `BadLine` (the errors file's entry), `DONE`
(its results are already in the output: not parsed again) or None (a blank line). `Results` is the
output file of a resumable job; `result_line` is one result as the file holds it; `check_settings`
keeps the settings its results were made with beside it (`<output>.job.json`) and refuses a resume
under others. docs/BATCH.md has the formats.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping

from llama_jax.inference import sampler, sampling
from llama_jax.inference.sampling import SamplingParams
from llama_jax.jobs import jobs
from llama_jax.model import settings
from llama_jax.weights import atomic

__all__ = [
    "DONE",
    "SAMPLING_FIELDS",
    "BadLine",
    "JobRequest",
    "Reader",
    "Results",
    "check_settings",
    "request_seed",
]

# The `SamplingParams` settings a request line may set (the seed is per sample: `JobRequest.samples`).
SAMPLING_FIELDS = settings.request_fields(SamplingParams)


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """A valid request line: its prompt ids and settings, and the samples of it still to run."""

    line: int
    id: str | int
    prompt: list[int]
    chat: bool
    sampling: SamplingParams  # canonical; each sample runs with its own seed in the job's one engine
    samples: tuple[tuple[str | int, int], ...]  # (result id, seed) of each sample still to run


class BadLine(ValueError):
    """A line the job cannot run: the errors file names its line, id and field."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.id: str | int | None = None  # set once the line's id is known


def request_seed(job_seed: int, request_id: str | int) -> int:
    """The seed of a request without its own: a hash of the job seed and the id (stable across runs,
    machines and Python versions), so requests draw independent streams."""
    digest = hashlib.sha256(f"{job_seed}:{json.dumps(request_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def id_key(request_id: str | int) -> str:
    return json.dumps(request_id)  # 7 and "7" are different ids


# ---- reading requests -----------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sampling(fields: Mapping, vocab: int) -> SamplingParams:
    """The request's sampling settings, checked by `SamplingParams` (its error names the field)."""
    try:
        params = SamplingParams(**fields)
        params.check_vocab(vocab)
    except sampling.InvalidSampling as e:
        raise BadLine(e.field, str(e)) from None
    return params.canonical()


def _check_seed(seed) -> None:
    try:
        sampling.check_field("seed", seed)
    except sampling.InvalidSampling as e:
        raise BadLine(e.field, str(e)) from None


def _check_n(n) -> None:
    if not (_is_int(n) and n >= 1):
        raise BadLine("n", f"n: expected an integer >= 1, got {json.dumps(n)}")


DONE = object()  # what the reader yields for a request whose result is already in the output


class Reader:
    """Parses and validates request lines; remembers ids (first line wins) for duplicates and ordering.

    Requests whose id is in `done` are neither validated nor tokenized again (a resumed job of
    millions of lines starts at once).
    """

    def __init__(self, path: pathlib.Path, tokenizer, model_config, defaults, done: Mapping) -> None:
        """defaults: the job's `batch.JobConfig` (per-request defaults and the job seed)."""
        from llama_jax.text.chat import ChatFormat

        self.path = path
        self.done = done
        self.tokenizer = tokenizer
        self.config = model_config
        self.defaults = defaults
        # What a line may hold: its id and prompt, and the settings of the job's that a request may set.
        self.fields = {"id", "prompt", "messages", *settings.request_fields(type(defaults))}
        self.first_line: dict[str, int] = {}  # id key -> line of its first appearance
        self.order: dict[str, float] = {}  # result id key -> its place in the output (input line, sample)
        try:
            self.chat, self.chat_error = ChatFormat(tokenizer), None
        except ValueError as e:
            self.chat, self.chat_error = None, str(e)
        try:
            _sampling({k: getattr(defaults, k) for k in SAMPLING_FIELDS}, model_config.vocab_size)
            _check_seed(defaults.seed)
            _check_n(defaults.n)
        except BadLine as e:
            raise ValueError(f"job setting {e}") from None

    def __iter__(self) -> Iterator[tuple[int, JobRequest | BadLine | object | None]]:
        """(line number, request | error | DONE | None for a blank line), for every line of the input."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, self._parse(number, raw)
                except BadLine as e:
                    yield number, e

    def _parse(self, number: int, raw: bytes) -> JobRequest | object | None:
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadLine(None, f"not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise BadLine(None, f"expected a JSON object, got {type(record).__name__}")
        if "id" not in record:
            raise BadLine("id", "missing id: every request needs an 'id' (a string or an integer)")
        request_id = record["id"]
        if not (isinstance(request_id, str) or _is_int(request_id)):
            raise BadLine("id", f"id: expected a string or an integer, got {json.dumps(request_id)}")
        try:
            return self._request(number, record, request_id)
        except BadLine as e:
            e.id = request_id
            raise

    def _request(self, number: int, record: dict, request_id: str | int) -> JobRequest | object:
        key = id_key(request_id)
        first = self.first_line.setdefault(key, number)
        if first != number:
            raise BadLine("id", f"duplicate id {json.dumps(request_id)} (first on line {first})")
        n = record.get("n", self.defaults.n)
        _check_n(n)
        ids = [request_id] if n == 1 else [f"{request_id}#{k}" for k in range(n)]
        for sample_id in ids if n > 1 else ():  # its "x#k" result ids are taken like ids
            taken = self.first_line.setdefault(id_key(sample_id), number)
            if taken != number:
                raise BadLine("id", f"result id {json.dumps(sample_id)} of this request is line {taken}'s id")
        for k, sample_id in enumerate(ids):
            self.order[id_key(sample_id)] = number + k / n
        todo = [k for k, sample_id in enumerate(ids) if id_key(sample_id) not in self.done]
        if not todo:
            return DONE
        unknown = sorted(set(record) - self.fields)
        if unknown:
            raise BadLine(unknown[0], f"unknown field(s) {unknown}; expected a subset of {sorted(self.fields)}")
        vocab = self.config.vocab_size
        sampling = _sampling({k: record.get(k, getattr(self.defaults, k)) for k in SAMPLING_FIELDS}, vocab)
        if "seed" in record:
            _check_seed(record["seed"])
        prompt, chat = self._prompt(record)
        too_big = [t for t in prompt if not 0 <= t < vocab]
        if too_big:
            raise BadLine("prompt", f"token id {too_big[0]} is outside the model's vocabulary [0, {vocab})")
        needed = len(prompt) + sampling.max_new_tokens
        if needed > self.config.max_seq_len:
            raise BadLine(
                "messages" if chat else "prompt",
                f"prompt too long: {len(prompt)} tokens + max_new_tokens={sampling.max_new_tokens} = {needed} "
                f"positions, beyond the model's context of {self.config.max_seq_len} (config.max_seq_len)",
            )
        seed = record["seed"] if "seed" in record else None
        if n == 1:
            samples = ((request_id, request_seed(self.defaults.seed, request_id) if seed is None else seed),)
        else:  # the seeds rejection.py gives its "<id>#<k>" requests
            samples = tuple((ids[k], request_seed(self.defaults.seed if seed is None else seed, ids[k])) for k in todo)
        return JobRequest(number, request_id, prompt, chat, sampling, samples)

    def _prompt(self, record: dict) -> tuple[list[int], bool]:
        if ("prompt" in record) == ("messages" in record):
            raise BadLine("prompt", "expected exactly one of 'prompt' (text) and 'messages' (a chat)")
        if "prompt" in record:
            if not isinstance(record["prompt"], str):
                raise BadLine("prompt", f"prompt: expected a string, got {type(record['prompt']).__name__}")
            return self.tokenizer.encode(record["prompt"], bos=True, eos=False), False
        if self.chat is None:
            raise BadLine("messages", f"messages: {self.chat_error}")
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise BadLine("messages", "messages: expected a non-empty list of message objects")
        try:
            return self.chat.encode_dialog(record["messages"]), True
        except (TypeError, ValueError, KeyError) as e:
            raise BadLine("messages", str(e)) from None


# ---- the results file -----------------------------------------------------------------------------------


class Results:
    """The output file: repaired and indexed on open, appended whole lines, canonical order at the end."""

    def __init__(self, path: pathlib.Path, writer: bool = True) -> None:
        self.path = path
        self.writer = writer  # False: another process (process 0 of a multi-process job) writes the file
        self.done: dict[str, tuple[int, int]] = {}  # id key -> (byte offset, length) of its line
        self.size = 0
        self.torn_bytes = 0
        if path.exists():
            self._repair_and_index()
        if writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair_and_index(self) -> None:
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):  # killed mid-write: the torn tail goes, the request reruns
                    self.torn_bytes = len(line)
                    break
                try:
                    key = id_key(json.loads(line)["id"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{self.path}, line {number}: not a result line of this job ({e}); "
                        f"move the file away or pass another --output"
                    ) from None
                if key in self.done:
                    raise ValueError(f"{self.path}, line {number}: id {key} is already on an earlier line")
                self.done[key] = (self.size, len(line))
                self.size += len(line)
        if self.torn_bytes and self.writer:
            with open(self.path, "r+b") as f:
                f.truncate(self.size)
                os.fsync(f.fileno())

    def append(self, lines: dict[str, bytes]) -> None:
        """Write the lines (by id key) with one `write` and make them durable before going on."""
        if self.writer:
            data = memoryview(b"".join(lines.values()))
            while data:  # a partial write (disk full, a signal) continues where it stopped
                data = data[os.write(self.fd, data) :]
            os.fsync(self.fd)
        for key, line in lines.items():
            self.done[key] = (self.size, len(line))
            self.size += len(line)

    def close(self) -> None:
        if self.writer:
            os.close(self.fd)

    def canonicalize(self, order: Mapping[str, int]) -> None:
        """Rewrite the file sorted by input line (ids the input lacks last, as they were), atomically."""
        entries = sorted((order.get(key, math.inf), offset, length) for key, (offset, length) in self.done.items())
        if not self.writer or all(a[1] < b[1] for a, b in itertools.pairwise(entries)):
            return
        with open(self.path, "rb") as src, atomic.replacing(self.path) as dst:
            for _, offset, length in entries:
                src.seek(offset)
                dst.write(src.read(length))


# ---- the settings the results were made with ------------------------------------------------------------


def settings_path(output: pathlib.Path) -> pathlib.Path:
    return output.with_name(output.name + ".job.json")


def check_settings(output: pathlib.Path, settings: Mapping, *, force: bool, writer: bool = True) -> None:
    """Refuse to resume `output` under other settings than its results were made with; record them.

    `settings`: what decides a result (the model's identity, the per-request defaults, the job seed),
    kept in `<output>.job.json`, written atomically before the first result. When `output` already
    has results and the record differs, raises ValueError naming every differing field (old -> new),
    unless `force`: the record then takes the new settings.
    """
    settings = json.loads(json.dumps(settings, default=str))  # as the record reads back: lists, not tuples
    record = settings_path(output)
    if output.is_file() and output.stat().st_size and record.is_file() and not force:
        try:
            recorded = json.loads(record.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{record}: not a job settings record ({e}); pass --force-resume to replace it") from None
        old, new = _flat(recorded), _flat(settings)
        changes = [
            f"{name}: {_shown(old, name)} -> {_shown(new, name)}"
            for name in sorted(old.keys() | new.keys())
            if old.get(name, _ABSENT) != new.get(name, _ABSENT)
        ]
        if not changes:
            return
        more = f" (and {len(changes) - 12} more)" if len(changes) > 12 else ""
        raise ValueError(
            f"{output} holds results made with other settings ({record}): {'; '.join(changes[:12])}{more}. "
            f"Resuming would mix the two: run with the recorded settings, write to another --output, or pass "
            f"--force-resume to resume anyway"
        )
    if writer:
        atomic.write_atomically(record, json.dumps(settings, indent=1, ensure_ascii=False) + "\n")


_ABSENT = object()


def _flat(value, name: str = "") -> dict:
    """{"model.config.dim": 4096, 'model.checkpoint.files["model.safetensors"]': [...], ...}"""
    if not isinstance(value, dict) or not value:
        return {name: value}
    flat = {}
    for key, sub in value.items():
        part = f".{key}" if key.isidentifier() else f"[{json.dumps(key)}]"
        flat.update(_flat(sub, f"{name}{part}" if name else key))
    return flat


def _shown(flat: dict, name: str) -> str:
    return json.dumps(flat[name]) if name in flat else "(absent)"


def result_line(request: JobRequest, result_id, result: sampler.GenerationResult, tokenizer, chat) -> bytes:
    tokens = list(result.tokens)
    record = {
        "id": result_id,
        "text": tokenizer.decode(tokens),
        "tokens": tokens,
        "prompt_tokens": len(request.prompt),
        "completion_tokens": len(tokens),
        "stop_reason": result.stop_reason,
    }
    if request.chat:
        record["message"] = chat.decode_result(result)
    if request.sampling.logprobs:
        record["logprobs"] = _finite(result.logprobs)
    if request.sampling.prompt_logprobs:
        record["prompt_logprobs"] = _finite(result.prompt_logprobs)
    if request.sampling.top_logprobs:
        ids, logprobs = result.top_logprobs
        stop = [] if result.stop_token is None else [result.stop_token]
        record["sequence"] = [*request.prompt, *tokens, *stop]
        record["completion_start"] = len(request.prompt)
        record["top_logprobs"] = {"ids": [list(r) for r in ids], "logprobs": [_finite(r) for r in logprobs]}
    return jobs.json_line(record)


def _finite(logprobs) -> list:
    """Log-probs for JSON: a token the processed distribution filtered out (-inf, which JSON cannot
    write) is null, as is a first prompt token's (nothing precedes it)."""
    return [x if x is not None and math.isfinite(x) else None for x in logprobs]


def count_lines(path: pathlib.Path) -> int:
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")  # a last line without its newline counts too


def error_record(path: pathlib.Path, line: int, request_id, field: str | None, reason: str) -> dict:
    return {"file": str(path), "line": line, "id": request_id, "field": field, "error": reason}

"""The batch-inference job: JSONL requests in, JSONL results out; resumable, continuously batched, data-parallel.

    python -m llama_jax batch --input prompts.jsonl --output results.jsonl [--checkpoint DIR]
    python -m llama_jax batch --config configs/batch.py --config.max_new_tokens=64 --mesh data=8
    summary = run_batch(model, tokenizer, "prompts.jsonl", "results.jsonl", max_new_tokens=64)

docs/BATCH.md has the formats. How it runs:

- Requests run on the continuous-batching engine (`llama_jax.engine`): `batch_size` decode slots over
  a paged KV cache, a request taking a slot as soon as another finishes, prompts sharing page-aligned
  prefixes (a system prompt, the `n` samples of one request) prefilled once. One engine per sampling
  setting (temperature, top-p/k, min-p, top_logprobs: they shape its programs); `max_new_tokens` is
  per request. Requests are fed to their engine as the input is read, a few slots' worth ahead.
- Each request samples from its own seed (`seed`, or one derived from the job seed and its id): token i
  is drawn with a key made of that seed and i alone, so its result does not depend on its neighbours,
  its slot, preemption or resumption, and equals `sampler.generate(model, [prompt], seed=seed)`.
- `n` > 1 samples a request n times: results `<id>#<k>`, k = 0..n-1, each with the seed
  `request_seed(seed, "<id>#<k>")` (seed: the request's, else the job's; what `rejection.py` uses).
- Results are appended in completion order, one whole line per `os.write`, fsync'd after each
  group of completions. A restart truncates a torn last line, skips ids already written, and at the end the file is
  rewritten in input order (temporary file + rename), so every complete run leaves the same bytes.
- Bad lines go to the errors file (`<output>.errors.jsonl`), rewritten whole at the end of a run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax

from llama_jax import atomic, engine, jobs, sampler, sampling
from llama_jax.sampling import SamplingParams
from sharding import distributed

__all__ = ["JobConfig", "job_config", "register", "request_seed", "run_batch"]

SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "top_logprobs")
REQUEST_FIELDS = {"id", "prompt", "messages", "seed", "n", *SAMPLING_FIELDS}


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A batch job's settings: the fields of `configs/batch.py`, each also `--config.<field>` on the CLI."""

    input: str | None = None  # JSONL requests
    output: str | None = None  # JSONL results
    errors: str | None = None  # bad lines and failures (default: <output>.errors.jsonl)
    checkpoint: str | None = None  # HF / Meta / Orbax directory (None: the embedded model, RANDOM weights)
    tokenizer: str | None = None  # tokenizer.model (default: found in the checkpoint)
    dtype: str | None = None  # bfloat16 for checkpoints, float32 for the embedded model
    mesh: str | None = None  # e.g. "data=8" or "data=2,tensor=4" (None: one device)
    rules: str = "fsdp_tp"  # sharding strategy on the mesh: dp, fsdp, tp, fsdp_tp
    attention: str = "auto"  # attention backend: auto | dense | blockwise | cudnn | splash (llama_jax/attention.py)
    fp8_matmul: str = "auto"  # FP8 checkpoints: auto | fp8 | dequant (llama_jax.platform.fp8_matmul)
    batch_size: int = 32  # decode slots: requests run together (rounded up to a power of two >= data parallelism)
    kv_pages: int | None = None  # KV cache pages per engine (None: batch_size x 2,048 tokens' worth)
    page_size: int = 64  # positions per KV page (prefix sharing works in whole pages)
    burst: int = 16  # decode steps per jitted call between scheduling
    progress: bool = True  # a tqdm bar on stderr
    # Per-request defaults; a request's own fields override them.
    max_new_tokens: int = 256
    temperature: float = sampling.META_TEMPERATURE  # Meta's defaults (0 = greedy)
    top_p: float = sampling.META_TOP_P
    top_k: int = 0
    min_p: float = 0.0
    seed: int = 0  # job seed: a request without `seed` gets request_seed(seed, id)
    n: int = 1  # samples per request (n > 1: results "<id>#<k>")
    top_logprobs: int = 0  # K > 0: record the K most likely tokens per step (distillation data)


@dataclasses.dataclass(frozen=True)
class _Request:
    line: int
    id: str | int
    prompt: list[int]
    chat: bool
    sampling: SamplingParams  # canonical, seed 0: one engine per setting (max_new_tokens aside)
    samples: tuple[tuple[str | int, int], ...]  # (result id, seed) of each sample still to run


class _BadLine(ValueError):
    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.id: str | int | None = None  # set once the line's id is known


def request_seed(job_seed: int, request_id: str | int) -> int:
    """The seed of a request without its own: a hash of the job seed and the id (stable across runs,
    machines and Python versions), so requests draw independent streams."""
    digest = hashlib.sha256(f"{job_seed}:{json.dumps(request_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _id_key(request_id: str | int) -> str:
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
        raise _BadLine(e.field, str(e)) from None
    return params.canonical()


def _check_seed(seed) -> None:
    try:
        sampling.check_field("seed", seed)
    except sampling.InvalidSampling as e:
        raise _BadLine(e.field, str(e)) from None


def _check_n(n) -> None:
    if not (_is_int(n) and n >= 1):
        raise _BadLine("n", f"n: expected an integer >= 1, got {json.dumps(n)}")


_DONE = object()  # what the reader yields for a request whose result is already in the output


class _Reader:
    """Parses and validates request lines; remembers ids (first line wins) for duplicates and ordering.

    Requests whose id is in `done` are neither validated nor tokenized again (a resumed job of
    millions of lines starts at once).
    """

    def __init__(self, path: pathlib.Path, tokenizer, model_config, defaults: JobConfig, done: Mapping) -> None:
        from llama_jax.chat import ChatFormat

        self.path = path
        self.done = done
        self.tokenizer = tokenizer
        self.config = model_config
        self.defaults = defaults
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
        except _BadLine as e:
            raise ValueError(f"job setting {e}") from None

    def __iter__(self) -> Iterator[tuple[int, _Request | _BadLine | object | None]]:
        """(line number, request | error | _DONE | None for a blank line), for every line of the input."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, self._parse(number, raw)
                except _BadLine as e:
                    yield number, e

    def _parse(self, number: int, raw: bytes) -> _Request | object | None:
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _BadLine(None, f"not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise _BadLine(None, f"expected a JSON object, got {type(record).__name__}")
        if "id" not in record:
            raise _BadLine("id", "missing id: every request needs an 'id' (a string or an integer)")
        request_id = record["id"]
        if not (isinstance(request_id, str) or _is_int(request_id)):
            raise _BadLine("id", f"id: expected a string or an integer, got {json.dumps(request_id)}")
        try:
            return self._request(number, record, request_id)
        except _BadLine as e:
            e.id = request_id
            raise

    def _request(self, number: int, record: dict, request_id: str | int) -> _Request | object:
        key = _id_key(request_id)
        first = self.first_line.setdefault(key, number)
        if first != number:
            raise _BadLine("id", f"duplicate id {json.dumps(request_id)} (first on line {first})")
        n = record.get("n", self.defaults.n)
        _check_n(n)
        ids = [request_id] if n == 1 else [f"{request_id}#{k}" for k in range(n)]
        for k, sample_id in enumerate(ids):
            self.order[_id_key(sample_id)] = number + k / n
        todo = [k for k, sample_id in enumerate(ids) if _id_key(sample_id) not in self.done]
        if not todo:
            return _DONE
        unknown = sorted(set(record) - REQUEST_FIELDS)
        if unknown:
            raise _BadLine(unknown[0], f"unknown field(s) {unknown}; expected a subset of {sorted(REQUEST_FIELDS)}")
        vocab = self.config.vocab_size
        sampling = _sampling({k: record.get(k, getattr(self.defaults, k)) for k in SAMPLING_FIELDS}, vocab)
        if "seed" in record:
            _check_seed(record["seed"])
        prompt, chat = self._prompt(record)
        too_big = [t for t in prompt if not 0 <= t < vocab]
        if too_big:
            raise _BadLine("prompt", f"token id {too_big[0]} is outside the model's vocabulary [0, {vocab})")
        needed = len(prompt) + sampling.max_new_tokens
        if needed > self.config.max_seq_len:
            raise _BadLine(
                "messages" if chat else "prompt",
                f"prompt too long: {len(prompt)} tokens + max_new_tokens={sampling.max_new_tokens} = {needed} "
                f"positions, beyond the model's context of {self.config.max_seq_len} (config.max_seq_len)",
            )
        seed = record["seed"] if "seed" in record else None
        if n == 1:
            samples = ((request_id, request_seed(self.defaults.seed, request_id) if seed is None else seed),)
        else:  # the seeds rejection.py gives its "<id>#<k>" requests
            samples = tuple((ids[k], request_seed(self.defaults.seed if seed is None else seed, ids[k])) for k in todo)
        return _Request(number, request_id, prompt, chat, sampling, samples)

    def _prompt(self, record: dict) -> tuple[list[int], bool]:
        if ("prompt" in record) == ("messages" in record):
            raise _BadLine("prompt", "expected exactly one of 'prompt' (text) and 'messages' (a chat)")
        if "prompt" in record:
            if not isinstance(record["prompt"], str):
                raise _BadLine("prompt", f"prompt: expected a string, got {type(record['prompt']).__name__}")
            return self.tokenizer.encode(record["prompt"], bos=True, eos=False), False
        if self.chat is None:
            raise _BadLine("messages", f"messages: {self.chat_error}")
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise _BadLine("messages", "messages: expected a non-empty list of message objects")
        try:
            return self.chat.encode_dialog(record["messages"]), True
        except (TypeError, ValueError, KeyError) as e:
            raise _BadLine("messages", str(e)) from None


# ---- the results file -----------------------------------------------------------------------------------


class _Results:
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
                    key = _id_key(json.loads(line)["id"])
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


def _result_line(request: _Request, result_id, result: sampler.GenerationResult, tokenizer, chat) -> bytes:
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
    if request.sampling.top_logprobs:
        ids, logprobs = result.top_logprobs
        stop = [] if result.stop_token is None else [result.stop_token]
        record["sequence"] = [*request.prompt, *tokens, *stop]
        record["completion_start"] = len(request.prompt)
        record["top_logprobs"] = {"ids": [list(r) for r in ids], "logprobs": [list(r) for r in logprobs]}
    return jobs.json_line(record)


# ---- the job ----------------------------------------------------------------------------------------------


def _data_parallelism(model) -> int:
    """How many devices split the batch: the mesh axes the rules map "batch" onto."""
    spec = getattr(model, "sharding", None)
    if spec is None:
        return 1
    axes = dict(spec.rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(spec.mesh.shape[a] for a in axes if a in spec.mesh.shape)


def _count_lines(path: pathlib.Path) -> int:
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")  # a last line without its newline counts too


class _Feed:
    """An engine's request source: what the job has queued for it so far. Unlike a generator it may
    run dry and later yield again (the engine pulls from it only when its own queue is empty)."""

    def __init__(self) -> None:
        self.queue: collections.deque[engine.Request] = collections.deque()

    def __iter__(self):
        return self

    def __next__(self) -> engine.Request:
        if not self.queue:
            raise StopIteration
        return self.queue.popleft()


class _Group:
    """The requests of one sampling setting and the engine that runs them."""

    def __init__(self, model, sampling: SamplingParams, settings: dict) -> None:
        self.engine = engine.Engine(
            model,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            top_logprobs=sampling.top_logprobs,
            **settings,
        )
        self.feed = _Feed()
        self.running: Iterator | None = None
        self.waiting: dict[tuple[int, int], tuple[_Request, int]] = {}  # engine id -> (request, sample index)

    def add(self, request: _Request) -> None:
        for k, (_, seed) in enumerate(request.samples):
            key = (request.line, k)
            self.waiting[key] = (request, k)
            self.feed.queue.append(engine.Request(key, request.prompt, request.sampling.max_new_tokens, seed))

    def results(self, drain: bool) -> Iterator[tuple[_Request, int, sampler.GenerationResult | ValueError]]:
        """Run the engine; stop once its queue is short (a few slots ahead of it) or, with drain, empty."""
        if self.running is None:
            self.running = self.engine.run(self.feed)
        for request, out in self.running:
            yield (*self.waiting.pop(request.id), out)
            if not drain and len(self.feed.queue) < self.engine.slots:
                return
        self.running = None


def run_batch(
    model,
    tokenizer,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    errors_path: str | os.PathLike | None = None,
    batch_size: int = 32,
    progress: bool = True,
    kv_pages: int | None = None,
    page_size: int = 64,
    burst: int = 16,
    **defaults,
) -> dict[str, Any]:
    """Run every request of `input_path` not yet in `output_path`; return the job's summary.

    Args:
      model, tokenizer: a `Llama` (placed on a mesh or not) and its `Tokenizer`.
      input_path: JSONL requests (docs/BATCH.md).
      output_path: JSONL results; an existing file is resumed (its ids are skipped).
      errors_path: bad lines and failed requests (default: `<output>.errors.jsonl`), rewritten each run.
      batch_size: decode slots of the engine (requests run together); rounded up to a power of two and
        to the number of devices the slots are split over.
      progress: show a tqdm bar on stderr (requests done, generated tokens/s).
      kv_pages, page_size, burst: the engine's KV page pool, page size and decode burst (`engine.Engine`).
      **defaults: per-request defaults, `JobConfig`'s sampling fields (max_new_tokens, temperature,
        top_p, top_k, min_p, seed, top_logprobs) and n.
    """
    from tqdm import tqdm

    job = jobs.config_from_mapping(JobConfig, defaults, source="run_batch")
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    errors_path = (
        pathlib.Path(errors_path) if errors_path else output_path.with_name(output_path.name + ".errors.jsonl")
    )
    if not input_path.is_file():
        raise FileNotFoundError(f"input {input_path} does not exist")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    batch_size = max(1 << (batch_size - 1).bit_length(), _data_parallelism(model))
    settings = dict(
        slots=batch_size, pages=kv_pages, page_size=page_size, burst=burst, stop_tokens=tuple(tokenizer.stop_tokens)
    )
    # On several processes (jax.distributed) every process runs the same schedule on its share of the
    # devices; process 0 alone writes the files.
    writer = jax.process_index() == 0
    results = _Results(output_path, writer)
    reader = _Reader(input_path, tokenizer, model.config, job, results.done)
    errors: list[dict] = []
    counts = dict(requests=0, skipped=0, completed=0, errors=0, failed=0, prompt_tokens=0, generated_tokens=0)
    compiles_before = engine.trace_counts()
    start = time.perf_counter()
    bar = tqdm(total=_count_lines(input_path), unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    groups: dict[SamplingParams, _Group] = {}
    samples_left: dict[int, int] = {}  # input line -> samples not yet finished

    def finished(request: _Request) -> None:
        samples_left[request.line] -= 1
        if not samples_left[request.line]:
            del samples_left[request.line]
            bar.update(1)

    def pump(group: _Group, drain: bool) -> None:
        lines = {}
        try:
            for request, k, out in group.results(drain):
                result_id = request.samples[k][0]
                if isinstance(out, ValueError):
                    errors.append(_error(input_path, request.line, result_id, None, f"generation failed: {out}"))
                    counts["failed"] += 1
                else:
                    lines[_id_key(result_id)] = _result_line(request, result_id, out, tokenizer, reader.chat)
                    counts["completed"] += 1
                    counts["prompt_tokens"] += len(request.prompt)
                    counts["generated_tokens"] += len(out.tokens)
                finished(request)
        except RuntimeError as e:  # e.g. out of device memory: report, go on, retried next run
            for request, k in group.waiting.values():
                errors.append(_error(input_path, request.line, request.samples[k][0], None, f"generation failed: {e}"))
                counts["failed"] += 1
                finished(request)
            groups.pop(next(key for key, g in groups.items() if g is group))
        if lines:
            results.append(lines)
        bar.set_postfix_str(f"{counts['generated_tokens'] / (time.perf_counter() - start):.1f} tok/s", refresh=False)

    try:
        for number, item in reader:
            if item is _DONE:
                counts["requests"] += 1
                counts["skipped"] += 1
                bar.update(1)
            elif isinstance(item, _Request):
                counts["requests"] += 1
                samples_left[item.line] = len(item.samples)
                key = dataclasses.replace(item.sampling, max_new_tokens=1)  # per request in the engine
                if key not in groups:
                    groups[key] = _Group(model, key, settings)
                groups[key].add(item)
                if len(groups[key].feed.queue) >= 2 * batch_size:
                    pump(groups[key], drain=False)
            else:
                if item is not None:
                    counts["requests"] += 1
                    counts["errors"] += 1
                    errors.append(_error(input_path, number, item.id, item.field, str(item)))
                bar.update(1)
        for group in list(groups.values()):
            pump(group, drain=True)
    finally:
        bar.close()
        results.close()
    errors.sort(key=lambda e: e["line"])
    if writer:
        atomic.write_atomically(errors_path, [jobs.json_line(e) for e in errors])
    results.canonicalize(reader.order)
    elapsed = time.perf_counter() - start
    compiles = engine.trace_counts()
    return {
        **counts,
        "torn_line_repaired": results.torn_bytes > 0,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(counts["completed"] / elapsed, 3) if elapsed else None,
        "generated_tokens_per_s": round(counts["generated_tokens"] / elapsed, 1) if elapsed else None,
        "compiles": {k: compiles[k] - compiles_before[k] for k in compiles},
        "output": str(output_path),
        "errors_file": str(errors_path),
    }


def _error(path: pathlib.Path, line: int, request_id, field: str | None, reason: str) -> dict:
    return {"file": str(path), "line": line, "id": request_id, "field": field, "error": reason}


# ---- loading and the command line ---------------------------------------------------------------------------


# Plain aliases for the settings one sets on every run; every field is also --config.<field>.
_ALIASES = {
    "input": "--input",
    "output": "--output",
    "errors": "--errors",
    "checkpoint": "--checkpoint",
    "tokenizer": "--tokenizer",
    "dtype": "--dtype",
    "mesh": "--mesh",
    "attention": "--attention",
    "batch_size": "--batch-size",
    "fp8_matmul": "--fp8-matmul",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "seed": "--seed",
    "top_logprobs": "--top-logprobs",
    "n": "--n",
    "kv_pages": "--kv-pages",
    "page_size": "--page-size",
    "burst": "--burst",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="run a JSONL file of requests (resumable)",
        description=__doc__.split("\n\n")[0],
        epilog="Settings come from JobConfig's defaults, then --config FILE (a get_config() file such as "
        "configs/batch.py), then the options given here. Formats: docs/BATCH.md.",
    )
    jobs.add_config_arguments(parser, JobConfig, _ALIASES)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS)
    parser.set_defaults(func=main)


def job_config(args: argparse.Namespace) -> JobConfig:
    """JobConfig defaults, overridden by --config FILE, overridden by the options given."""
    job = jobs.config_from_args(JobConfig, args)
    for name in ("input", "output"):
        if getattr(job, name) is None:
            raise ValueError(f"no {name} file: pass --{name} PATH (or set `{name}` in the --config file)")
    return job


def main(args: argparse.Namespace) -> int:
    from llama_jax.platform import enable_compile_cache

    enable_compile_cache()
    distributed.initialize()  # a multi-process job (jax.distributed coordinates in the environment), else nothing
    try:
        job = job_config(args)
        model, tokenizer = jobs.load_model(
            job.checkpoint,
            tokenizer=job.tokenizer,
            dtype=job.dtype,
            mesh=job.mesh,
            rules=job.rules,
            attention=job.attention,
            fp8_matmul=job.fp8_matmul,
        )
        sampling = {name: getattr(job, name) for name in (*SAMPLING_FIELDS, "seed", "n")}
        summary = run_batch(
            model,
            tokenizer,
            job.input,
            job.output,
            errors_path=job.errors,
            batch_size=job.batch_size,
            progress=job.progress,
            kv_pages=job.kv_pages,
            page_size=job.page_size,
            burst=job.burst,
            **sampling,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"batch: error: {e}", file=sys.stderr)
        return 2
    print(
        f"[{summary['completed']} done, {summary['skipped']} already done, {summary['errors']} bad lines, "
        f"{summary['failed']} failed; {summary['generated_tokens_per_s']} tok/s; errors: {summary['errors_file']}]",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0

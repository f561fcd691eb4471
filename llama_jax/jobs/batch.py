"""The batch-inference job: JSONL requests in, JSONL results out; resumable, continuously batched, data-parallel.

    python -m llama_jax batch --input prompts.jsonl --output results.jsonl [--checkpoint DIR]
    python -m llama_jax batch --config batch --config.max_new_tokens=64 --mesh data=8
    summary = run_batch(model, tokenizer, "prompts.jsonl", "results.jsonl", max_new_tokens=64)

docs/BATCH.md has the formats. How it runs:

- Requests run on the continuous-batching engine (`llama_jax.inference.engine`): `batch_size` decode slots over
  a paged KV cache, a request taking a slot as soon as another finishes, prompts sharing page-aligned
  prefixes (a system prompt, the `n` samples of one request) prefilled once. One engine for the
  job: each request runs with its own `SamplingParams`, requests of one sampling mode in one burst.
  Requests are fed to the engine as the input is read, a few slots' worth ahead.
- Each request samples from its own seed (`seed`, or one derived from the job seed and its id): token i
  is drawn with a key made of that seed and i alone, so its result does not depend on its neighbours,
  its slot, preemption or resumption, and equals `sampler.generate(model, [prompt], seed=seed)`.
- `n` > 1 samples a request n times: results `<id>#<k>`, k = 0..n-1, each with the seed
  `request_seed(seed, "<id>#<k>")` (seed: the request's, else the job's; what `rejection.py` uses).
- Results are appended in completion order, one whole line per `os.write`, fsync'd after each
  group of completions. A restart truncates a torn last line, skips ids already written, and at the end the file is
  rewritten in input order (temporary file + rename), so every complete run leaves the same bytes.
- Bad lines go to the errors file (`<output>.errors.jsonl`), rewritten whole at the end of a run.
- What decides a result (the model's identity, the per-request defaults, the job seed) is recorded in
  `<output>.job.json` before the first result; a resume under other settings is refused, naming each
  field that differs, unless `force_resume`. Paths, the mesh and the engine's sizes may change.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax

from llama_jax.inference import engine, sampler, sampling
from llama_jax.inference.sampling import SamplingParams
from llama_jax.jobs import jobs
from llama_jax.jobs.batch_files import (
    DONE,
    JobRequest,
    Reader,
    Results,
    check_settings,
    count_lines,
    error_record,
    id_key,
    request_seed,
    result_line,
)
from llama_jax.model import settings
from llama_jax.model.settings import setting
from llama_jax.sharding import distributed
from llama_jax.weights import atomic

__all__ = ["REQUEST_FIELDS", "JobConfig", "job_config", "register", "request_seed", "run_batch"]


@settings.declare(
    SamplingParams,
    "top_k",
    "min_p",
    "top_logprobs",
    "logprobs",
    "prompt_logprobs",
    "logprobs_mode",
    "json_schema",
    "regex",
    "choice",
    max_new_tokens=256,
    temperature=sampling.META_TEMPERATURE,  # Meta's chat defaults
    top_p=sampling.META_TOP_P,
)
class JobConfig(jobs.ModelSettings):
    """A batch job's settings, each declared once (`llama_jax.model.settings`): `llama_jax/configs/batch.py`'s fields,
    `--config.<field>` and the flag named on the CLI, and (per request) a request line's field. The model's
    are `jobs.ModelSettings`'; the sampling ones `SamplingParams`', with the job's defaults (a request's own
    fields override them)."""

    input: str | None = setting(None, "JSONL requests (required)", flag=True)
    output: str | None = setting(None, "JSONL results (required); an existing file is resumed", flag=True)
    errors: str | None = setting(None, "bad lines and failed requests (none: OUTPUT.errors.jsonl)", flag=True)
    batch_size: int = setting(
        32, "decode slots: requests run together (rounded up to a power of two >= data parallelism)", flag=True
    )
    kv_pages: int | None = setting(
        None, "KV cache pages per engine (none: batch_size x 2,048 tokens' worth)", flag=True
    )
    page_size: int = setting(64, "positions per KV page (prefix sharing works in whole pages)", flag=True)
    burst: int = setting(16, "decode steps per jitted call between scheduling steps", flag=True)
    progress: bool = setting(True, "a tqdm bar on stderr", flag=True)
    force_resume: bool = setting(
        False, "resume an output whose results were made with other settings (OUTPUT.job.json)", flag=True
    )
    peer_timeout_s: float = setting(
        60.0, "several processes: a peer silent this long stops the others (exit 75)", flag="--peer-timeout"
    )
    seed: int = setting(
        0, "the job seed: a request without its own seed samples with request_seed(seed, id)", flag=True, request=True
    )
    n: int = setting(1, "samples per request; n > 1 writes results ID#K", flag=True, request=True)


# What a request line may hold: its id and prompt, and the settings it may set for itself.
REQUEST_FIELDS = frozenset({"id", "prompt", "messages", *settings.request_fields(JobConfig)})
# What decides a result besides the model: the per-request defaults (with the job seed and n).
_DECISIVE = settings.request_fields(JobConfig)


# ---- the job ----------------------------------------------------------------------------------------------


def _data_parallelism(model) -> int:
    """How many devices split the batch: the mesh axes the rules map "batch" onto."""
    spec = getattr(model, "sharding", None)
    if spec is None:
        return 1
    axes = dict(spec.rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(spec.mesh.shape[a] for a in axes if a in spec.mesh.shape)


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


class _Running:
    """The job's engine (one for every sampling setting: each request carries its own) and what it runs."""

    def __init__(self, model, tokenizer, settings: dict) -> None:
        self.engine = engine.Engine(model, tokenizer=tokenizer, **settings)
        self.stop_tokens = tuple(tokenizer.stop_tokens)
        self.feed = _Feed()
        self.running: Iterator | None = None
        self.waiting: dict[tuple[int, int], tuple[JobRequest, int]] = {}  # engine id -> (request, sample index)

    def add(self, request: JobRequest) -> None:
        for k, (_, seed) in enumerate(request.samples):
            key = (request.line, k)
            self.waiting[key] = (request, k)
            params = dataclasses.replace(request.sampling, seed=seed, stop_tokens=self.stop_tokens)
            self.feed.queue.append(engine.Request(key, request.prompt, params))

    def results(self, drain: bool) -> Iterator[tuple[JobRequest, int, sampler.GenerationResult | ValueError]]:
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
    model_identity: dict | None = None,
    force_resume: bool = False,
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
      model_identity: what identifies the model, recorded in `<output>.job.json` with the defaults below
        (default: `jobs.model_identity(model)`; pass the checkpoint and tokenizer paths to it, as the CLI
        does, so that new weights under the same architecture are told apart).
      force_resume: resume even if `<output>.job.json` records other settings (else a ValueError names them).
      batch_size: decode slots of the engine (requests run together); rounded up to a power of two and
        to the number of devices the slots are split over.
      progress: show a tqdm bar on stderr (requests done, generated tokens/s).
      kv_pages, page_size, burst: the engine's KV page pool, page size and decode burst (`engine.Engine`).
      **defaults: per-request defaults, `JobConfig`'s sampling fields (max_new_tokens, temperature,
        top_p, top_k, min_p, seed, top_logprobs, json_schema, regex, choice) and n. A constraint the
        grammar library cannot compile fails its request (an errors-file line naming it and the reason);
        the job goes on.
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
    settings = dict(slots=batch_size, pages=kv_pages, page_size=page_size, burst=burst)
    # On several processes (jax.distributed) every process runs the same schedule on its share of the
    # devices; process 0 alone writes the files.
    writer = jax.process_index() == 0
    decisive = {name: getattr(job, name) for name in _DECISIVE}
    identity = jobs.model_identity(model) if model_identity is None else model_identity
    check_settings(output_path, {"model": identity, **decisive}, force=force_resume, writer=writer)
    results = Results(output_path, writer)
    reader = Reader(input_path, tokenizer, model.config, job, results.done)
    errors: list[dict] = []
    counts = dict(requests=0, skipped=0, completed=0, errors=0, failed=0, prompt_tokens=0, generated_tokens=0)
    compiles_before = engine.trace_counts()
    start = time.perf_counter()
    bar = tqdm(total=count_lines(input_path), unit="req", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    running: _Running | None = None  # made at the first request to run
    samples_left: dict[int, int] = {}  # input line -> samples not yet finished

    def finished(request: JobRequest) -> None:
        samples_left[request.line] -= 1
        if not samples_left[request.line]:
            del samples_left[request.line]
            bar.update(1)

    def pump(group: _Running, drain: bool) -> None:
        nonlocal running
        lines = {}
        try:
            for request, k, out in group.results(drain):
                result_id = request.samples[k][0]
                if isinstance(out, ValueError):
                    errors.append(error_record(input_path, request.line, result_id, None, f"generation failed: {out}"))
                    counts["failed"] += 1
                else:
                    lines[id_key(result_id)] = result_line(request, result_id, out, tokenizer, reader.chat)
                    counts["completed"] += 1
                    counts["prompt_tokens"] += len(request.prompt)
                    counts["generated_tokens"] += len(out.tokens)
                finished(request)
        except RuntimeError as e:  # e.g. out of device memory: report, go on, retried next run
            for request, k in group.waiting.values():
                errors.append(
                    error_record(input_path, request.line, request.samples[k][0], None, f"generation failed: {e}")
                )
                counts["failed"] += 1
                finished(request)
            running = None
        if lines:
            results.append(lines)
        bar.set_postfix_str(f"{counts['generated_tokens'] / (time.perf_counter() - start):.1f} tok/s", refresh=False)

    try:
        for number, item in reader:
            if item is DONE:
                counts["requests"] += 1
                counts["skipped"] += 1
                bar.update(1)
            elif isinstance(item, JobRequest):
                counts["requests"] += 1
                samples_left[item.line] = len(item.samples)
                running = running or _Running(model, tokenizer, settings)
                running.add(item)
                if len(running.feed.queue) >= 2 * batch_size:
                    pump(running, drain=False)
            else:
                if item is not None:
                    counts["requests"] += 1
                    counts["errors"] += 1
                    errors.append(error_record(input_path, number, item.id, item.field, str(item)))
                bar.update(1)
        if running is not None:
            pump(running, drain=True)
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


# ---- loading and the command line ---------------------------------------------------------------------------


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="run a JSONL file of requests (resumable)",
        description=__doc__.split("\n\n")[0],
        epilog="Settings come from JobConfig's defaults, then --config FILE (a get_config() file such as "
        "llama_jax/configs/batch.py), then the options given here. Formats: docs/BATCH.md.",
    )
    settings.add_config_arguments(parser, JobConfig)
    parser.set_defaults(func=main)


def job_config(args: argparse.Namespace) -> JobConfig:
    """JobConfig defaults, overridden by --config FILE, overridden by the options given."""
    job = jobs.config_from_args(JobConfig, args)
    for name in ("input", "output"):
        if getattr(job, name) is None:
            raise ValueError(f"no {name} file: pass --{name} PATH (or set `{name}` in the --config file)")
    return job


def main(args: argparse.Namespace) -> int:
    from llama_jax.model.platform import enable_compile_cache

    enable_compile_cache()
    finished = False
    try:
        job = job_config(args)
        # A multi-process job (jax.distributed coordinates in the environment), else nothing.
        distributed.initialize(peer_timeout_s=job.peer_timeout_s)
        model, tokenizer = jobs.load_job_model(job, engine=True)
        sampling = {name: getattr(job, name) for name in _DECISIVE}
        summary = run_batch(
            model,
            tokenizer,
            job.input,
            job.output,
            errors_path=job.errors,
            model_identity=jobs.job_model_identity(job, model),
            force_resume=job.force_resume,
            batch_size=job.batch_size,
            progress=job.progress,
            kv_pages=job.kv_pages,
            page_size=job.page_size,
            burst=job.burst,
            **sampling,
        )
        finished = True
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"batch: error: {e}", file=sys.stderr)
        return 2
    finally:  # a process that failed goes silent: its peers stop within their peer timeout, naming it
        (distributed.shutdown if finished else distributed.abandon)()
    print(
        f"[{summary['completed']} done, {summary['skipped']} already done, {summary['errors']} bad lines, "
        f"{summary['failed']} failed; {summary['generated_tokens_per_s']} tok/s; errors: {summary['errors_file']}]",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0

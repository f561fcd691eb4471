"""What the long-running jobs (`batch`, `train`, `rejection`) share: settings as a frozen dataclass, from three layers.

    defaults of the dataclass  <  --config FILE (a `get_config()` ml-collections file)  <  options given

Every field is also `--config.<field>=VALUE` on the command line (ml-collections' override style),
and the common ones have a plain alias (`--steps`, `--checkpoint`). And the one way a job gets its
model: a checkpoint (or the embedded default), on a mesh when one is given, with its tokenizer. And
how their outputs reach the disk: whole JSON lines, files replaced atomically (temporary + rename + fsync).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import typing
from collections.abc import Mapping
from typing import Any

from llama_jax.atomic import fsync_dir, write_atomically  # the shared atomic writer, re-exported for the jobs

__all__ = [
    "add_config_arguments",
    "config_from_args",
    "config_from_mapping",
    "fsync_dir",
    "job_model_identity",
    "json_line",
    "load_model",
    "model_identity",
    "tokenizer_file",
    "write_atomically",
]


def config_from_mapping(cls, values: Mapping[str, Any], *, source: str):
    """`cls(**values)`, refusing unknown fields by name (a typo must not silently keep a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {k: tuple(v) if _base(hints[k]) is tuple and isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def _base(kind):
    """The type of a field, without `| None`; `tuple[str, ...]` → tuple."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        kind = next(t for t in args if t is not type(None))
    return typing.get_origin(kind) or kind


def _parse_value(kind, name: str):
    """An argparse `type` for a field: its type, "none" for optional ones, true/false for bools, a,b,c for tuples."""
    optional = type(None) in typing.get_args(kind)
    base = _base(kind)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"{name}: expected true or false, got {text!r}")
            return text.lower() in ("true", "1")
        if base is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected {base.__name__}, got {text!r}") from None

    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls, aliases: Mapping[str, str] = ()) -> None:
    """`--config NAME|FILE` and `--config.<field>` for every field of `cls`; `aliases` maps fields to plain flags."""
    parser.add_argument("--config", help="the job's get_config(): a packaged preset's name or a .py file")
    hints = typing.get_type_hints(cls)
    aliases = dict(aliases)
    for field in dataclasses.fields(cls):
        names = [aliases[field.name]] if field.name in aliases else []
        parser.add_argument(
            *names,
            f"--config.{field.name}",
            dest=field.name,
            default=argparse.SUPPRESS,
            type=_parse_value(hints[field.name], field.name),
            help=f"default {field.default!r}",
        )


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass's defaults, overridden by `--config FILE`, overridden by the options given."""
    from llama_jax.config import load_config_file

    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(load_config_file(args.config).to_dict())
    config = config_from_mapping(cls, values, source=str(args.config))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return dataclasses.replace(config, **given)


def tokenizer_file(checkpoint, tokenizer=None) -> pathlib.Path:
    """The tokenizer.model a job uses: `tokenizer` if given, else the checkpoint's, else (no checkpoint)
    the Llama 3 one that llama-models ships."""
    from llama_jax import default_model
    from llama_jax.tokenizer import find_tokenizer

    if tokenizer is not None:
        return pathlib.Path(tokenizer)
    path = default_model.tokenizer_path() if checkpoint is None else find_tokenizer(checkpoint)
    if path is None:
        where = checkpoint or "the embedded model"
        raise ValueError(f"{where}: no tokenizer.model found (install llama-models or pass --tokenizer PATH)")
    return path


_MODEL_FIELDS = ("checkpoint", "tokenizer", "dtype", "mesh", "rules", "attention", "fp8_matmul")


def load_job_model(job, **overrides):
    """`load_model` from a job's settings: its `checkpoint`, `tokenizer`, `dtype`, `mesh`, `rules` and,
    where the job has them, `attention` and `fp8_matmul`; `overrides` replace any (a teacher's checkpoint)."""
    settings = {name: getattr(job, name) for name in _MODEL_FIELDS if hasattr(job, name)} | overrides
    return load_model(settings.pop("checkpoint"), **settings)


def load_model(
    checkpoint,
    *,
    tokenizer=None,
    dtype: str | None = None,
    mesh: str | None = None,
    rules: str = "fsdp_tp",
    attention: str = "auto",
    fp8_matmul: str = "auto",
):
    """(model, tokenizer): `checkpoint` (None: the embedded default, announced on stderr), on `mesh`.

    dtype defaults to bfloat16 for checkpoints and float32 for the small embedded model; `mesh` is a
    `make_mesh` string ("fsdp=2,tensor=4"), `rules` a sharding strategy name, `attention` a backend
    of `llama_jax.attention.BACKENDS`, `fp8_matmul` how an FP8 checkpoint's FFNs multiply (auto | fp8 |
    dequant; checked even for a model without FP8 weights).
    """
    from llama_jax import default_model, platform
    from llama_jax.loading import load
    from llama_jax.placement import llama_rules, shard_model
    from llama_jax.sharding.mesh import make_mesh
    from llama_jax.tokenizer import Tokenizer

    if fp8_matmul not in platform.FP8_MATMUL_MODES:
        raise ValueError(f"fp8_matmul: expected one of {platform.FP8_MATMUL_MODES}, got {fp8_matmul!r}")
    tokenizer_path = tokenizer_file(checkpoint, tokenizer)
    mesh = make_mesh(mesh) if mesh else None
    if checkpoint is None:
        print(default_model.RANDOM_WEIGHTS_NOTICE, file=sys.stderr, flush=True)
        model = default_model.default_model(dtype=dtype or "float32", warn=False, attention=attention)
        if mesh is not None:
            model = shard_model(model, mesh, rules)
    else:
        model = load(
            checkpoint,
            dtype=dtype or "bfloat16",
            mesh=mesh,
            rules=llama_rules(rules) if mesh else None,
            attention=attention,
            fp8_matmul=fp8_matmul,
        )
    return model, Tokenizer.from_file(tokenizer_path)


def model_identity(model, checkpoint=None, tokenizer=None) -> dict:
    """What tells a job's model from another without reading its weights: `model`'s architecture, dtype,
    attention backend, FP8 and LoRA settings, and the `checkpoint` directory and `tokenizer` file it was read
    from with the size and modification time of every file (weights rewritten under one path change them)."""

    def spec(value):
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    return {
        "config": dataclasses.asdict(model.config),
        "dtype": str(model.dtype),
        "attention": model.options.attention_backend,
        "fp8": spec(model.fp8),
        "lora": spec(model.lora),
        "checkpoint": _file_stamps(checkpoint),
        "tokenizer": _file_stamps(tokenizer),
    }


def job_model_identity(job, model) -> dict:
    """`model_identity` of the model `load_job_model(job)` gave: with the checkpoint and tokenizer files it read."""
    return model_identity(model, job.checkpoint, tokenizer_file(job.checkpoint, job.tokenizer))


def _file_stamps(path) -> dict | None:
    """{"path", "files": {name: [bytes, mtime_ns]}} for a file or every file under a directory."""
    if path is None:
        return None
    path = pathlib.Path(path).absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamps = {}
    for file in files:
        stat = file.stat()
        stamps[file.name if file == path else file.relative_to(path).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return {"path": str(path), "files": stamps}


def json_line(record: dict) -> bytes:
    """One JSONL line (UTF-8, not ASCII-escaped, newline-terminated)."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()

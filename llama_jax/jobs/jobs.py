"""What the long-running jobs (`batch`, `train`, `rejection`) share: settings as a frozen dataclass, from three layers.

    defaults of the dataclass  <  --config FILE (a `get_config()` ml-collections file)  <  options given

Every field is also `--config.<field>=VALUE` on the command line (ml-collections' override style),
and the common ones have a plain flag (`--steps`, `--checkpoint`): all of it derived from the fields'
declarations (`llama_jax.model.settings`). And the one way a job gets its model: a checkpoint (or the
embedded default), on a mesh when one is given, with its tokenizer, every setting checked before a
weight is read (`check_job`, then `loading.load`'s own order). And how their outputs reach the disk: whole JSON lines,
files replaced atomically (temporary + rename + fsync).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

from llama_jax.model import settings
from llama_jax.model.settings import (  # re-exported too
    add_config_arguments,
    config_from_args,
    config_from_mapping,
    setting,
)
from llama_jax.weights.atomic import fsync_dir, write_atomically  # the shared atomic writer, re-exported for the jobs

__all__ = [
    "ModelSettings",
    "add_config_arguments",
    "check_job",
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


def tokenizer_file(checkpoint, tokenizer=None) -> pathlib.Path:
    """The tokenizer.model a job uses: `tokenizer` if given, else the checkpoint's (`find_tokenizer`), else
    (no checkpoint) the Llama 3 one that llama-models ships. The error says where it looked and what to do."""
    from llama_jax.text.tokenizer import TOKENIZER_PLACES, find_tokenizer
    from llama_jax.weights import default_model

    if tokenizer is not None:
        if not pathlib.Path(tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such file")
        return pathlib.Path(tokenizer)
    if checkpoint is None:
        path = default_model.tokenizer_path()
        if path is None:
            raise FileNotFoundError(
                "the embedded default model uses the Llama 3 tokenizer.model of the llama-models package, "
                "which is not installed: `pip install llama-models`, or pass --tokenizer PATH"
            )
        return path
    path = find_tokenizer(checkpoint)
    if path is None:
        looked = " and ".join(str(pathlib.Path(checkpoint) / place) for place in TOKENIZER_PLACES)
        raise FileNotFoundError(
            f"{checkpoint}: no tokenizer.model (looked for {looked}); copy the tokenizer.model of this "
            f"model's download there, or pass --tokenizer PATH"
        )
    return path


# Fields a job may have, checked by `check_job` before its model loads: files it reads, paths it creates
# (a file, or the directory `workdir`), and other checkpoints it loads later (their layout only).
_INPUTS = ("input", "data")
_OUTPUTS = ("output", "errors", "workdir")
_OTHER_CHECKPOINTS = ("teacher", "reward_model")


def check_job(job) -> None:
    """What can be wrong with a job's settings without its model, raised before any weight is read: its
    sampling fields (as one `SamplingParams`, whose error names the field), files it reads, paths it
    will create, and the layout of the other checkpoints it loads."""
    from llama_jax.inference.sampling import SamplingParams
    from llama_jax.weights.loading import open_checkpoint

    sampling = [f.name for f in dataclasses.fields(SamplingParams) if f.name != "stop_tokens" and hasattr(job, f.name)]
    if "max_new_tokens" in sampling:
        SamplingParams(**{name: getattr(job, name) for name in sampling})
    for name in _INPUTS:
        path = getattr(job, name, None)
        if path is not None and not pathlib.Path(path).exists():
            raise FileNotFoundError(f"{name}: {path} does not exist")
    for name in _OUTPUTS:
        if getattr(job, name, None) is not None:
            _check_creatable(name, pathlib.Path(getattr(job, name)), directory=name == "workdir")
    for name in _OTHER_CHECKPOINTS:
        if getattr(job, name, None) is not None:
            open_checkpoint(getattr(job, name))


def _check_creatable(name: str, path: pathlib.Path, *, directory: bool) -> None:
    """`path` can be written: not a directory where a file goes (or the reverse), under a writable directory."""
    if path.exists() and path.is_dir() != directory:
        raise ValueError(f"{name}: {path} is a {'file' if directory else 'directory'}")
    parent = path.parent
    while not parent.exists():  # the job creates the missing directories
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{name}: cannot create {path}: {parent} is a file")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise ValueError(f"{name}: cannot write {path}: {parent} is not writable")


@settings.declare()
class ModelSettings:
    """How a job (and generate, chat) gets its model: these settings' one declaration (`llama_jax.model.settings`)."""

    checkpoint: str | None = setting(
        None, "HF, Meta or Orbax directory (none: the embedded model, RANDOM weights)", flag=True
    )
    tokenizer: str | None = setting(
        None, "tokenizer.model (none: the checkpoint's, or llama-models' Llama 3 one)", flag=True
    )
    dtype: str | None = setting(
        None, "bfloat16 or float32 (none: bfloat16 for a checkpoint, float32 for the embedded model)", flag=True
    )
    mesh: str | None = setting(
        None, "e.g. data=8, data=2,tensor=4, data=-1 (every device); none: one device", flag=True
    )
    rules: str = setting("fsdp_tp", "sharding strategy on the mesh: dp, fsdp, tp, fsdp_tp")
    attention: str = setting(
        "auto",
        "attention backend: auto (blockwise on CPU, cudnn on GPU, splash on TPU; the engine's pages: a Pallas "
        "kernel on TPU/GPU), dense, blockwise, cudnn, splash (batch and rejection: auto or blockwise only)",
        flag=True,
    )
    fp8_matmul: str = setting(
        "auto",
        "FP8 checkpoints: fp8 (fp8 GEMMs), dequant (upcast in the matmul) or auto (on FP8-tensor-core GPUs: "
        "dequant for decode's few rows, fp8 GEMMs for prefill; dequant elsewhere)",
        flag=True,
    )


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSettings))


def load_job_model(job, *, engine: bool = False, **overrides):
    """`load_model` from a job's settings, once `check_job` passed: its `checkpoint`, `tokenizer`, `dtype`,
    `mesh`, `rules` and, where the job has them, `attention` and `fp8_matmul`; `overrides` replace any
    (a teacher's checkpoint). `engine`: the model will run the engine's paged cache (batch, rejection),
    so its attention must be one that cache runs (`attention.check_paged`)."""
    check_job(job)
    if engine:
        from llama_jax.model.attention import check_paged

        check_paged(job.attention)
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
    of `llama_jax.model.attention.BACKENDS`, `fp8_matmul` how an FP8 checkpoint's FFNs multiply (auto | fp8 |
    dequant; checked even for a model without FP8 weights).

    One sequence for every source, `loading.load`'s (the embedded model is its `DefaultCheckpoint`):
    the settings (the mesh and rules, `loading.check_backends`), then the checkpoint (its layout, config
    and tensor list), then the tokenizer, then the weights; so a typo or a wrong directory is reported
    in seconds, and a missing tokenizer never hides a checkpoint that could not load anyway.
    """
    from llama_jax.sharding.mesh import make_mesh
    from llama_jax.text.tokenizer import Tokenizer
    from llama_jax.weights import default_model, loading
    from llama_jax.weights.placement import llama_rules

    checkpoint = None if checkpoint is None else pathlib.Path(checkpoint)  # a flag's text or a caller's path
    mesh = make_mesh(mesh) if mesh else None
    rules_table = llama_rules(rules) if mesh else None
    tokenizers = []

    def before_weights(_):
        tokenizers.append(Tokenizer.from_file(tokenizer_file(checkpoint, tokenizer)))
        if checkpoint is None:
            print(default_model.RANDOM_WEIGHTS_NOTICE, file=sys.stderr, flush=True)

    model = loading.load(
        default_model.DefaultCheckpoint() if checkpoint is None else checkpoint,
        dtype=dtype or ("float32" if checkpoint is None else "bfloat16"),
        mesh=mesh,
        rules=rules_table,
        attention=attention,
        fp8_matmul=fp8_matmul,
        before_weights=before_weights,
    )
    return model, tokenizers[0]


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

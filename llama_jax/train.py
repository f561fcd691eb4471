"""Fine-tuning and distillation with optax: full SFT, LoRA, teacher → student; Orbax checkpoints, resume.

The `train` job: `TrainJob` (the fields of `llama_jax/configs/finetune_*.py`, `llama_jax/configs/distill.py` and
`llama_jax/configs/dpo.py`), `run_job` (load, add adapters, train, export the merged model) and the command
`python -m llama_jax train`. The training itself is `llama_jax.trainer.Trainer`, importable from here
too with its `TrainConfig`; the losses are `llama_jax.losses`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from llama_jax.trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "TrainJob", "Trainer", "run_job"]


# ---- the job: `python -m llama_jax train --config finetune_lora` -----------------------------


@dataclasses.dataclass(frozen=True)
class TrainJob(TrainConfig):
    """A whole fine-tuning run: `TrainConfig` plus model, data, adapters, teacher, mesh and outputs.

    The fields of `llama_jax/configs/finetune_*.py`; each is also `--config.<field>` on the command line.
    """

    data: str | None = None  # JSONL: chat {"messages"}, text {"text"} or the batch job's top_logprobs records
    data_kind: str = "auto"  # auto | chat | text | distill | pairs (preference pairs; implied by objective=dpo)
    seq_len: int = 512
    seed: int = 0  # data order
    checkpoint: str | None = None  # the model to train (None: the embedded default, RANDOM weights)
    tokenizer: str | None = None
    dtype: str | None = None  # bfloat16 for checkpoints, float32 for the embedded model
    lora_rank: int = 0  # > 0: train LoRA adapters only; 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    teacher: str | None = None  # online teacher checkpoint (distillation); with objective=dpo, the reference
    dpo_reference: str = "precompute"  # precompute (one pass, cached in workdir) | online (a reference model)
    teacher_rules: str | None = None  # the teacher's sharding strategy on the mesh (default: `rules`)
    mesh: str | None = None  # e.g. "fsdp=2,tensor=4" (None: one device)
    rules: str = "fsdp_tp"
    attention: str = "auto"  # attention backend (llama_jax/attention.py)
    fp8_matmul: str = "auto"  # FP8 checkpoints: auto | fp8 | dequant (llama_jax.platform.fp8_matmul)
    workdir: str = "runs/train"  # checkpoints/, metrics.jsonl, model/
    resume: bool = False  # continue from the latest checkpoint in workdir
    export: str = "orbax"  # the trained model (LoRA merged) to workdir/model: orbax | hf | none
    progress: bool = True

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


def run_job(job: TrainJob) -> Trainer:
    """Load, train (resuming if asked), export; returns the `Trainer` (`.model`, `.history`)."""
    from llama_jax import data, jobs, lora
    from llama_jax.convert import save

    if job.data is None:
        raise ValueError("no training data: pass --data PATH (or set `data` in the --config file)")
    if job.export not in ("orbax", "hf", "none"):
        raise ValueError(f"export: expected orbax, hf or none, got {job.export!r}")
    model, tokenizer = jobs.load_job_model(job)
    if job.lora_rank > 0:
        model = lora.add_adapters(
            model, lora.LoraSpec(rank=job.lora_rank, alpha=job.lora_alpha, targets=tuple(job.lora_targets))
        )
    teacher = None
    if job.teacher is not None:
        teacher, _ = jobs.load_job_model(job, checkpoint=job.teacher, rules=job.teacher_rules or job.rules)
    if job.objective == "dpo":
        from llama_jax import dpo

        examples, teacher = dpo.job_pairs(job, model, tokenizer, teacher)
    else:
        examples = data.load_examples(job.data, tokenizer=tokenizer, seq_len=job.seq_len, kind=job.data_kind)
    loader = data.Loader(examples, job.batch_size, seed=job.seed)
    trainer = Trainer(model, job.train_config(), teacher=teacher, workdir=job.workdir)
    trainer.fit(loader, resume=job.resume, progress=job.progress)
    if job.export != "none":
        trained = trainer.model
        save(
            lora.merge(trained) if trained.lora is not None else trained,
            pathlib.Path(job.workdir) / "model",
            to=job.export,
            overwrite=True,
            progress=job.progress,
            tokenizer=jobs.tokenizer_file(job.checkpoint, job.tokenizer),
        )
    return trainer


_ALIASES = {
    "data": "--data",
    "checkpoint": "--checkpoint",
    "workdir": "--workdir",
    "steps": "--steps",
    "mesh": "--mesh",
    "teacher": "--teacher",
    "batch_size": "--batch-size",
    "fp8_matmul": "--fp8-matmul",
}


def register(subparsers) -> None:
    from llama_jax import jobs

    parser = subparsers.add_parser(
        "train",
        help="fine-tune, distill or DPO (SFT, LoRA, teacher → student, preference pairs), resumable",
        description=__doc__.split("\n\n")[0],
        epilog="Settings come from TrainJob's defaults, then --config FILE (llama_jax/configs/finetune_*.py), then the "
        "options given here. docs/TRAINING.md has the details.",
    )
    jobs.add_config_arguments(parser, TrainJob, _ALIASES)
    parser.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=argparse.SUPPRESS,
        help="continue from the latest checkpoint in the workdir",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from llama_jax import jobs
    from llama_jax.platform import enable_compile_cache

    enable_compile_cache()
    try:
        job = jobs.config_from_args(TrainJob, args)
        history = run_job(job).history
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(history[-1] if history else {}))
    return 0

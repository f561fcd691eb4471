"""Fine-tuning and distillation with optax: full SFT, LoRA, teacher → student; Orbax checkpoints, resume.

The `train` job: `TrainJob` (the fields of `llama_jax/configs/finetune_*.py`, `llama_jax/configs/distill.py` and
`llama_jax/configs/dpo.py`), `run_job` (load, add adapters, train, export the merged model) and the command
`python -m llama_jax train`. The training itself is `llama_jax.jobs.trainer.Trainer`, importable from here
too with its `TrainConfig`; the losses are `llama_jax.jobs.losses`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from llama_jax.jobs import jobs
from llama_jax.jobs.trainer import TrainConfig, Trainer
from llama_jax.model.settings import setting

__all__ = ["TrainConfig", "TrainJob", "Trainer", "run_job"]


# ---- the job: `python -m llama_jax train --config finetune_lora` -----------------------------


@dataclasses.dataclass(frozen=True)
class TrainJob(TrainConfig, jobs.ModelSettings):
    """A whole fine-tuning run: the model's settings (`jobs.ModelSettings`), how to optimise (`TrainConfig`),
    and the data, adapters, teacher and outputs declared here, each once (`llama_jax.model.settings`).

    The fields of `llama_jax/configs/finetune_*.py`; each is also `--config.<field>` on the command line,
    and the flag it declares (docs/TRAINING.md's table is `settings.markdown_table(TrainJob)`).
    """

    data: str | None = setting(
        None, 'JSONL: chat {"messages"}, text {"text"}, the batch job\'s top_logprobs records or pairs', flag=True
    )
    data_kind: str = setting("auto", "auto, chat, text, distill or pairs (preference pairs; implied by objective=dpo)")
    seq_len: int = setting(512, "tokens per row")
    seed: int = setting(0, "data order")
    lora_rank: int = setting(0, "> 0: train LoRA adapters only; 0: full fine-tuning")
    lora_alpha: float = setting(16.0, "the adapters' scale: W + (alpha / rank) · A B")
    lora_targets: tuple[str, ...] = setting(("wq", "wk", "wv", "wo"), "the projections adapted (a comma list)")
    teacher: str | None = setting(
        None, "online teacher checkpoint (distillation); with objective=dpo, the reference", flag=True
    )
    dpo_reference: str = setting("precompute", "precompute (one pass, cached in workdir) or online (a reference model)")
    teacher_rules: str | None = setting(None, "the teacher's sharding strategy on the mesh (none: `rules`)")
    workdir: str = setting("runs/train", "checkpoints/, metrics.jsonl, model/", flag=True)
    resume: bool = setting(False, "continue from the latest checkpoint in workdir", flag=True)
    export: str = setting("orbax", "the trained model (LoRA merged) to workdir/model: orbax, hf or none")
    progress: bool = setting(True, "a progress bar on stderr", flag=True)

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})


def run_job(job: TrainJob) -> Trainer:
    """Load, train (resuming if asked), export; returns the `Trainer` (`.model`, `.history`)."""
    from llama_jax.jobs import data
    from llama_jax.jobs.convert import save
    from llama_jax.weights import lora

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
        from llama_jax.jobs import dpo

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


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune, distill or DPO (SFT, LoRA, teacher → student, preference pairs), resumable",
        description=__doc__.split("\n\n")[0],
        epilog="Settings come from TrainJob's defaults, then --config FILE (llama_jax/configs/finetune_*.py), then the "
        "options given here. docs/TRAINING.md has the details.",
    )
    jobs.add_config_arguments(parser, TrainJob)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from llama_jax.model.platform import enable_compile_cache

    enable_compile_cache()
    try:
        job = jobs.config_from_args(TrainJob, args)
        history = run_job(job).history
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(history[-1] if history else {}))
    return 0

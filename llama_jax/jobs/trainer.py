"""The `Trainer`: fine-tuning and distillation with optax (full SFT, LoRA, teacher → student), Orbax resume.

    model = lora.add_adapters(llama_jax.load(path), LoraSpec(rank=16))       # or the model itself: full SFT
    loader = data.Loader(data.load_examples("sft.jsonl", tokenizer=tok, seq_len=1024), batch_size=32, seed=0)
    trainer = Trainer(model, TrainConfig(steps=1000, learning_rate=2e-4), workdir="runs/sft")
    history = trainer.fit(loader)                  # metrics per step; checkpoints every N steps
    trainer.model                                  # the trained model (a `Llama`)

The trainable parameters are the `nnx.LoRAParam`s when the model has adapters, else every `nnx.Param`.
They are kept as a float32 master copy (`Trainer.params`), cast to their stored dtype (bf16) for the
forward pass, so the optimizer state is float32 and small updates are not lost to bf16 rounding.

One optimizer step is one jitted function: the global batch is cut into `grad_accum` micro-batches
scanned over with summed gradients, the loss is the mean over every trained token of the global batch
(so accumulation changes nothing but memory), the teacher (if any) runs inside the same program under
`stop_gradient`, and the optimizer (AdamW, warm-up + cosine, global-norm clipping) updates the master
params. On a mesh the params, the optimizer state (sharded like the params: FSDP) and the batch keep
the model's logical sharding rules.

Objectives (`llama_jax.jobs.losses` has the formulas), per trained target token (`loss_mask`):
    sft      cross-entropy
    distill  (1 - w) · cross-entropy + w · τ² · KL(teacher_τ ‖ student_τ), w = `distill_weight`,
             τ = `distill_temperature`: over the whole vocabulary with an online teacher, over the
             teacher's top-K + "the rest" with precomputed top-K log-probs (the batch job's `top_logprobs`)
    dpo      per preference pair (`objective="dpo"`, batches of `dpo.PairExamples`): sigmoid DPO with
             `dpo_beta` and `dpo_label_smoothing` (conservative DPO), robust DPO or IPO (`dpo_loss`),
             against reference log-probs precomputed into the batch (`ref_logps`) or from an online
             `reference` model; the mean is over pairs, and the metrics are rewards/chosen,
             rewards/rejected, rewards/margins and rewards/accuracies (see `llama_jax/jobs/dpo.py`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.jobs.losses import DPO_LOSSES, cross_entropy, full_kl, topk_kl
from llama_jax.jobs.workdir import Workdir
from llama_jax.model import unstacked
from llama_jax.model.model import Llama
from llama_jax.model.settings import setting
from llama_jax.sharding.rules import logical_to_spec
from llama_jax.weights.placement import state_shardings

__all__ = ["TrainConfig", "Trainer", "learning_rate_schedule", "make_optimizer"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to optimise (the `train` fields of `llama_jax/configs/finetune_*.py`), each declared once
    (`llama_jax.model.settings`)."""

    steps: int = setting(100, "optimizer steps", flag=True)
    batch_size: int = setting(8, "sequences per optimizer step (the global batch)", flag=True)
    grad_accum: int = setting(1, "micro-batches per step; batch_size % grad_accum == 0")
    learning_rate: float = setting(1e-4, "peak, after the linear warm-up")
    warmup_steps: int = setting(10, "steps of linear warm-up")
    end_lr_ratio: float = setting(0.1, "cosine decay to learning_rate * end_lr_ratio at `steps`")
    weight_decay: float = setting(0.0, "AdamW, on matrices only (not norms)")
    b1: float = setting(0.9, "AdamW's first-moment decay")
    b2: float = setting(0.95, "AdamW's second-moment decay")
    eps: float = setting(1e-8, "AdamW's epsilon")
    clip_norm: float = setting(1.0, "global gradient norm; 0 = off")
    remat: bool = setting(True, "rematerialise each layer in the backward pass")
    distill_temperature: float = setting(1.0, "the temperature both distributions are softened by")
    distill_weight: float = setting(1.0, "weight of the KL term when there is a teacher signal")
    checkpoint_every: int = setting(0, "steps between Orbax checkpoints (0: only at the end); needs a workdir")
    keep_checkpoints: int = setting(3, "checkpoints kept in the workdir")
    log_every: int = setting(1, "steps between metrics lines (workdir/metrics.jsonl) and progress updates")
    objective: str = setting("sft", "sft (cross-entropy, + KL with a teacher signal) | dpo (preference pairs)")
    dpo_beta: float = setting(0.1, "DPO's beta")
    dpo_loss: str = setting("sigmoid", "sigmoid (DPO; with label smoothing: conservative DPO) | robust | ipo")
    dpo_label_smoothing: float = setting(0.0, "cDPO's label smoothing, in [0, 0.5)")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.distill_temperature <= 0 or not 0 <= self.distill_weight <= 1:
            raise ValueError("TrainConfig: distill_temperature must be > 0 and distill_weight in [0, 1]")
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"TrainConfig.objective: expected 'sft' or 'dpo', got {self.objective!r}")
        if self.dpo_beta <= 0 or not 0 <= self.dpo_label_smoothing < 0.5:
            raise ValueError("TrainConfig: dpo_beta must be > 0 and dpo_label_smoothing in [0, 0.5)")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"TrainConfig.dpo_loss: expected sigmoid, robust or ipo, got {self.dpo_loss!r}")


# ---- the optimizer ---------------------------------------------------------------------------------------


def _decayed(params) -> Any:
    """Weight decay on matrices only: not on norm scales (named "...norm.weight")."""
    return jax.tree_util.tree_map_with_path(lambda path, _: not any("norm" in str(p) for p in path), params)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine decay to `learning_rate * end_lr_ratio` at `steps`."""
    # Step s of the warm-up runs at learning_rate · (s + 1) / (warmup_steps + 1): the first step trains.
    return optax.warmup_cosine_decay_schedule(
        init_value=config.learning_rate / (min(config.warmup_steps, config.steps - 1) + 1),
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, config.steps - 1),
        decay_steps=config.steps,
        end_value=config.learning_rate * config.end_lr_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the warm-up + cosine schedule, after global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(config),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
        mask=_decayed,
    )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw) if config.clip_norm > 0 else adamw


# ---- the trainer ----------------------------------------------------------------------------------------

_BATCH_AXES = {
    "teacher_ids": ("batch", "seq", None),
    "teacher_logprobs": ("batch", "seq", None),
    "ref_logps": ("batch", None),
}


class Trainer:
    """Trains `model`'s trainable parameters (adapters if it has any, else all) on `Loader` batches.

    Args:
      model: a `Llama`, on one device or placed on a mesh (`load(..., mesh=)`, `shard_model`).
      config: the optimisation settings.
      teacher: an online teacher `Llama` for distillation (any size, its own sharding rules, the same
        devices and vocabulary); batches carrying `teacher_ids` use those precomputed log-probs instead.
        With `objective="dpo"` it is the online reference model (batches carrying `ref_logps` use those).
      workdir: where checkpoints (`workdir/checkpoints/<step>`) and `metrics.jsonl` go; None: nowhere.
    """

    def __init__(self, model: Llama, config: TrainConfig, *, teacher: Llama | None = None, workdir=None):
        if model.fp8 is not None:
            raise ValueError("training an FP8-loaded model is not supported: load the bf16 weights")
        if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                f"({model.config.vocab_size})"
            )
        if model.lora is None and unstacked.held(model):
            raise ValueError(
                "full fine-tuning of a model held Unstacked (its layers take more than "
                f"{unstacked.COPY_BUDGET:.0%} of each GPU, `llama_jax.model.unstacked`) cannot fit: the float32 "
                "master weights and AdamW state alone take 6x its bf16 weights; train adapters "
                "(`lora.add_adapters`) or load it on more devices"
            )
        self.config = config
        self.trainable = nnx.LoRAParam if model.lora is not None else nnx.Param
        self._graphdef, params, frozen = nnx.split(model, self.trainable, ...)
        self._stored = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params))
        self._sharding = model.sharding
        self.frozen = nnx.to_pure_dict(frozen)
        self.tx = make_optimizer(config)
        # A copy even when already float32: the step donates the master params, never the model's arrays.
        master = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), nnx.to_pure_dict(params))
        self._param_shardings = self._shardings_of(params)
        self.params = jax.device_put(master, self._param_shardings) if self._param_shardings else master
        self._opt_shardings = None
        if self._param_shardings is not None:
            replicated = NamedSharding(self._sharding.mesh, PartitionSpec())
            self._opt_shardings = optax.tree_map_params(
                self.tx,
                lambda _, s: s,
                jax.eval_shape(self.tx.init, self.params),
                self._param_shardings,
                transform_non_params=lambda _: replicated,
            )
        self.opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings)(self.params)
        self._teacher_graphdef, self.teacher_params = (None, None) if teacher is None else nnx.split(teacher)
        self._schedule = learning_rate_schedule(config)
        self.step = 0
        self.history: list[dict[str, float]] = []  # every logged step's metrics, across fit() calls
        self.workdir = None if workdir is None else pathlib.Path(workdir)
        self._dir = None if workdir is None else Workdir(workdir, keep=config.keep_checkpoints)
        self._loss_and_grads_fn = jax.jit(jax.value_and_grad(self._mean_loss))
        self._step_fn = jax.jit(
            self._train_step,
            donate_argnums=(0, 1),
            out_shardings=(self._param_shardings, self._opt_shardings, None),
        )

    # -- state -----------------------------------------------------------------------------------------

    def _shardings_of(self, params: nnx.State):
        if self._sharding is None:
            return None
        return nnx.to_pure_dict(state_shardings(params, self._sharding))

    @property
    def shardings(self) -> tuple[Any, Any]:
        """(master params, optimizer state) shardings on the model's mesh; (None, None) on one device."""
        return self._param_shardings, self._opt_shardings

    def _model_params(self, master) -> Any:
        """The master params cast to the dtypes the model stores them in (bf16 weights stay bf16)."""
        return jax.tree.map(lambda p, s: p.astype(s.dtype), master, self._stored)

    @property
    def model(self) -> Llama:
        """The model with the current trained parameters (a new `Llama`; the arrays are copies)."""
        return nnx.merge(self._graphdef, jax.jit(self._model_params)(self.params), self.frozen)

    # -- one step --------------------------------------------------------------------------------------

    def _batch_sharding(self, name: str, shape) -> NamedSharding | None:
        if self._sharding is None:
            return None
        names = _BATCH_AXES.get(name, ("batch", "seq") if len(shape) == 2 else ("batch", None, "seq"))
        spec = logical_to_spec(names, self._sharding.rules, mesh=self._sharding.mesh, shape=shape)
        return NamedSharding(self._sharding.mesh, spec)

    def _loss_sums(self, master, frozen, teacher_state, micro) -> tuple[jax.Array, dict]:
        """(loss Σ, metric Σs) of one micro-batch; the loss is later divided by the global token count."""
        config = self.config
        model = nnx.merge(self._graphdef, self._model_params(master), frozen)
        if config.objective == "dpo":
            from llama_jax.jobs import dpo

            reference = None if teacher_state is None else nnx.merge(self._teacher_graphdef, teacher_state)
            return dpo.loss_sums(
                model,
                reference,
                micro,
                beta=config.dpo_beta,
                loss=config.dpo_loss,
                label_smoothing=config.dpo_label_smoothing,
                remat=config.remat,
            )
        logits, _ = model.forward(
            micro["tokens"], micro["positions"], segment_ids=micro["segment_ids"], remat=config.remat
        )
        mask = micro["loss_mask"]
        ce = cross_entropy(logits, micro["targets"], mask)
        sums = {
            "ce": ce,
            "trained_tokens": jnp.sum(mask),
            "tokens": jnp.sum(micro["segment_ids"] > 0).astype(jnp.float32),
        }
        if teacher_state is not None:
            teacher = nnx.merge(self._teacher_graphdef, teacher_state)
            teacher_logits, _ = teacher.forward(micro["tokens"], micro["positions"], segment_ids=micro["segment_ids"])
            kl = full_kl(logits, jax.lax.stop_gradient(teacher_logits), mask, config.distill_temperature)
        elif "teacher_ids" in micro:
            kl = topk_kl(logits, micro["teacher_ids"], micro["teacher_logprobs"], mask, config.distill_temperature)
        else:
            return ce, sums
        sums["kl"] = kl
        return (1 - config.distill_weight) * ce + config.distill_weight * kl, sums

    def _train_step(self, master, opt_state, frozen, teacher_state, batch):
        accum = self.config.grad_accum

        def micro_batches(x):
            # Row r of micro-batch a is row r * accum + a: each micro-batch spans every data shard.
            return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

        def one(carry, micro):
            grads_sum, sums = carry
            (_, step_sums), grads = jax.value_and_grad(self._loss_sums, has_aux=True)(
                master, frozen, teacher_state, micro
            )
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            return (grads_sum, jax.tree.map(jnp.add, sums, step_sums)), step_sums

        micros = jax.tree.map(micro_batches, batch)
        zeros = jax.tree.map(jnp.zeros_like, master)
        _, sums0 = jax.eval_shape(
            lambda: self._loss_sums(master, frozen, teacher_state, jax.tree.map(lambda x: x[0], micros))
        )
        init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0))
        (grads_sum, sums), _ = jax.lax.scan(one, init, micros)
        tokens = _denominator(sums)
        grads = jax.tree.map(lambda g: g / tokens, grads_sum)
        updates, opt_state = self.tx.update(grads, opt_state, master)
        master = optax.apply_updates(master, updates)
        metrics = {name: value / tokens for name, value in sums.items() if name in ("ce", "kl", "dpo")}
        metrics.update({name: value / tokens for name, value in sums.items() if name.startswith("rewards/")})
        if "dpo" in sums:
            metrics["loss"] = metrics.pop("dpo")
            metrics["pairs"] = sums["pairs"]
        elif "kl" in sums:
            w = self.config.distill_weight
            metrics["loss"] = (1 - w) * metrics["ce"] + w * metrics["kl"]
        else:
            metrics["loss"] = metrics["ce"]
        metrics["tokens"] = sums["tokens"]  # input tokens, padding excluded
        metrics["trained_tokens"] = sums["trained_tokens"]  # targets the loss covers
        metrics["grad_norm"] = optax.tree.norm(grads)
        return master, opt_state, metrics

    def loss_and_grads(self, batch: Mapping[str, np.ndarray]) -> tuple[float, dict]:
        """The loss of a batch (mean over its trained tokens) and its gradient with respect to the
        trainable parameters (a pure dict in the model's layout), without updating anything."""

        loss, grads = self._loss_and_grads_fn(self.params, self.frozen, self.teacher_params, self._place(batch))
        return float(loss), grads

    def evaluate(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The metrics of a batch (loss, and for DPO the rewards, margins and accuracy) without training."""
        loss_sum, sums = jax.jit(self._loss_sums)(self.params, self.frozen, self.teacher_params, self._place(batch))
        denominator = _denominator(sums)
        out = {"loss": float(loss_sum / denominator)}
        out.update({k: float(v / denominator) for k, v in sums.items() if k.startswith("rewards/")})
        return out

    def _mean_loss(self, master, frozen, teacher_params, batch):
        loss_sum, sums = self._loss_sums(master, frozen, teacher_params, batch)
        return loss_sum / _denominator(sums)

    def _place(self, batch: Mapping[str, np.ndarray]) -> dict:
        if self._sharding is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        # Abstract batches (ShapeDtypeStructs, to lower for a compile target) are placed without data.
        return {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._batch_sharding(k, v.shape))
            if isinstance(v, jax.ShapeDtypeStruct)
            else jax.device_put(v, self._batch_sharding(k, v.shape))
            for k, v in batch.items()
        }

    def train_step(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a global batch (`Loader.batch(step)`); returns its metrics."""
        if batch["tokens"].shape[0] != self.config.batch_size:
            raise ValueError(
                f"batch has {batch['tokens'].shape[0]} rows, TrainConfig.batch_size is {self.config.batch_size}"
            )
        batch = self._place(batch)
        lr = float(self._schedule(self.step))
        self.params, self.opt_state, metrics = self._step_fn(
            self.params, self.opt_state, self.frozen, self.teacher_params, batch
        )
        self.step += 1
        out = {"step": self.step, "learning_rate": lr}
        out.update({k: float(v) for k, v in metrics.items()})
        return out

    def lower_step(self, batch: Mapping[str, np.ndarray], *, platforms=None) -> jax.stages.Lowered:
        """The program `train_step(batch)` runs, lowered (not compiled, not run); `platforms`
        ("cuda", "tpu", ...) lowers it for machines other than this one."""
        from llama_jax.model import platform

        args = (self.params, self.opt_state, self.frozen, self.teacher_params, self._place(batch))
        with platform.lowering_for(platforms[0] if platforms else None):  # what attention "auto" selects for
            traced = self._step_fn.trace(*args)
        return traced.lower(lowering_platforms=platforms)

    # -- the loop --------------------------------------------------------------------------------------

    def fit(
        self,
        loader,
        *,
        resume: bool = False,
        progress: bool = True,
        callback: Callable[[dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train from `self.step` (or the latest checkpoint, with `resume`) to `config.steps`.

        Batch `s` is `loader.batch(s)`, so a resumed run sees exactly the batches of an uninterrupted
        one. Returns the metrics of every logged step; `callback(metrics)` sees them as they come.
        """
        from tqdm import tqdm

        if resume:
            self.restore()
        elif self._dir is not None and self.step == 0 and self._dir.latest_step() is not None:
            raise ValueError(f"{self.workdir} already holds checkpoints: resume them (--resume) or use a new workdir")
        history = []
        with tqdm(total=self.config.steps, initial=self.step, desc="train", unit="step", disable=not progress) as bar:
            while self.step < self.config.steps:
                started = time.perf_counter()
                metrics = self.train_step(loader.batch(self.step))  # returns with the step done (floats)
                metrics["step_time_s"] = time.perf_counter() - started  # the first one includes compiling
                metrics["epoch"] = loader.epoch(self.step - 1)
                metrics["tokens_per_s"] = metrics["tokens"] / metrics["step_time_s"]
                bar.update(1)
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    history.append(metrics)
                    self.history.append(metrics)
                    if self._dir is not None:
                        self._dir.log(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    if callback is not None:
                        callback(metrics)
                every = self.config.checkpoint_every
                if self._dir is not None and (self.step == self.config.steps or (every and self.step % every == 0)):
                    self.save()
        if self._dir is not None:
            self._dir.wait()
        return history

    # -- checkpoints ------------------------------------------------------------------------------------

    def _workdir(self) -> Workdir:
        if self._dir is None:
            raise ValueError("this Trainer has no workdir: pass Trainer(..., workdir=DIR) to save or resume")
        return self._dir

    def save(self) -> None:
        """Write params + optimizer state + step (the data position) as checkpoint `step` (atomic)."""
        meta = {"step": self.step, "trainable": self.trainable.__name__, "config": dataclasses.asdict(self.config)}
        self._workdir().save(self.step, {"params": self.params, "opt_state": self.opt_state}, meta)

    def restore(self, step: int | None = None) -> int:
        """Load checkpoint `step` (default: the latest complete one); returns the step, 0 if none."""
        workdir = self._workdir()
        step = workdir.latest_step() if step is None else step
        if step is None:
            return self.step
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"params": self.params, "opt_state": self.opt_state},
        )
        state, meta = workdir.restore(step, target)
        if meta["trainable"] != self.trainable.__name__:
            raise ValueError(
                f"{workdir.checkpoints().directory}/{step}: checkpoint trained {meta['trainable']}s, "
                f"this model trains {self.trainable.__name__}s (LoRA vs full fine-tuning mismatch)"
            )
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step = int(meta["step"])
        workdir.truncate_log(self.step)
        return self.step


def _denominator(sums: dict) -> jax.Array:
    """What a step's loss is the mean over: pairs (DPO) or trained tokens."""
    return jnp.maximum(sums["pairs"] if "pairs" in sums else sums["trained_tokens"], 1.0)

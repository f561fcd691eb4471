"""Training losses: pure functions of float32 logits or sequence log-probs, summed (not averaged).

Each token loss is a sum over trained targets (`mask_bt > 0`); the `Trainer` divides by the global
count of trained tokens (or, for DPO, of pairs), so gradient accumulation never changes the result.

Per trained target token:
    cross_entropy  -log softmax(logits)[target]
    full_kl        τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)) over the whole vocabulary (an
                   online teacher)
    topk_kl        the same over K + 1 categories, the teacher's top-K ids and "the rest" (the batch
                   job's precomputed `top_logprobs`): exact at τ = 1 for the information stored,
                   zero when the student equals the teacher, the full KL at K = V - 1

Per preference pair (`dpo_loss`), with h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))
from `sequence_logps`:
    sigmoid  -(1 - ε) · log σ(β h) - ε · log σ(-β h)     (DPO; ε = label_smoothing > 0: conservative DPO)
    robust   (-(1 - ε) · log σ(β h) + ε · log σ(-β h)) / (1 - 2ε)   (robust DPO: ε = the label-flip rate)
    ipo      (h' - 1 / (2 β))²                           (IPO, h' with each log-ratio divided by its reply's
                                                          token count, as TRL computes it)
Rewards: β · (log π - log π_ref) of each reply; margin = chosen - rejected; accuracy = [margin > 0].
These are TRL's `DPOTrainer` definitions (`loss_type="sigmoid"`, `"robust"`, `"ipo"`), which
`tests/test_dpo.py` checks to 1e-5 on the same model and pairs; TRL 1.x dropped the conservative
variant from "sigmoid" (it was TRL 0.x's `label_smoothing`), so that one is checked against its formula.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["DPO_LOSSES", "cross_entropy", "dpo_loss", "full_kl", "sequence_logps", "topk_kl"]

DPO_LOSSES = ("sigmoid", "robust", "ipo")


def _masked_sum(x_bt: jax.Array, mask_bt: jax.Array, axis: int | None = None) -> jax.Array:
    # `where`, not only `* mask`: an untrained position's inf or NaN (a -inf target log-prob) must not leak.
    return jnp.sum(jnp.where(mask_bt > 0, x_bt * mask_bt, 0.0), axis=axis)


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Σ over trained tokens of -log softmax(logits)[target]."""
    return _masked_sum(optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt), mask_bt)


def full_kl(student_btv: jax.Array, teacher_btv: jax.Array, mask_bt: jax.Array, temperature: float) -> jax.Array:
    """Σ over trained tokens of τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)) over the vocabulary."""
    t_logp = jax.nn.log_softmax(teacher_btv / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(student_btv / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    return temperature**2 * _masked_sum(kl_bt, mask_bt)


def _with_rest(logp_btk: jax.Array, rest_bt: jax.Array) -> jax.Array:
    return jnp.concatenate([logp_btk, rest_bt[..., None]], axis=-1)


def topk_kl(
    student_btv: jax.Array,
    teacher_ids_btk: jax.Array,
    teacher_logprobs_btk: jax.Array,
    mask_bt: jax.Array,
    temperature: float,
) -> jax.Array:
    """Σ over trained tokens of τ² · KL over K + 1 categories: the teacher's top-K ids and the rest.

    Both distributions are the untempered log-probs of those categories (the student's from its full
    softmax, "the rest" = everything else), tempered and renormalised over the K + 1 categories.
    """
    s_logp_btv = jax.nn.log_softmax(student_btv, axis=-1)
    s_topk = jnp.take_along_axis(s_logp_btv, teacher_ids_btk, axis=-1)
    in_topk = (
        jnp.zeros(student_btv.shape, bool)
        .at[
            jnp.arange(student_btv.shape[0])[:, None, None],
            jnp.arange(student_btv.shape[1])[None, :, None],
            teacher_ids_btk,
        ]
        .set(True)
    )
    s_rest = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, s_logp_btv), axis=-1)
    t_mass = jnp.sum(jnp.exp(teacher_logprobs_btk), axis=-1)
    t_rest = jnp.log(jnp.clip(1.0 - t_mass, 1e-30))  # the teacher's tail mass, floored at ~0
    t_logp = jax.nn.log_softmax(_with_rest(teacher_logprobs_btk, t_rest) / temperature, axis=-1)
    s_logp = jax.nn.log_softmax(_with_rest(s_topk, s_rest) / temperature, axis=-1)
    kl_bt = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
    return temperature**2 * _masked_sum(kl_bt, mask_bt)


def sequence_logps(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Σ over trained targets of log softmax(logits)[target], per row: [B]."""
    token_logp_bt = -optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    return _masked_sum(token_logp_bt, mask_bt, axis=-1)


def dpo_loss(
    logps_b2: jax.Array,
    ref_logps_b2: jax.Array,
    lengths_b2: jax.Array,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-pair losses [B] and per-pair metrics (rewards, margin, accuracy), from sequence log-probs [B, 2]."""
    ratios = logps_b2 - ref_logps_b2  # log π / π_ref of chosen, rejected
    if loss == "sigmoid":
        h = beta * (ratios[:, 0] - ratios[:, 1])
        per_pair = -(1 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    elif loss == "robust":
        h = beta * (ratios[:, 0] - ratios[:, 1])
        flipped = label_smoothing * jax.nn.log_sigmoid(-h)
        per_pair = (-(1 - label_smoothing) * jax.nn.log_sigmoid(h) + flipped) / (1 - 2 * label_smoothing)
    elif loss == "ipo":
        per_token = ratios / jnp.maximum(lengths_b2, 1.0)
        per_pair = (per_token[:, 0] - per_token[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss: expected one of {DPO_LOSSES}, got {loss!r}")
    rewards = beta * jax.lax.stop_gradient(ratios)
    margin = rewards[:, 0] - rewards[:, 1]
    metrics = {
        "rewards/chosen": rewards[:, 0],
        "rewards/rejected": rewards[:, 1],
        "rewards/margins": margin,
        "rewards/accuracies": (margin > 0).astype(jnp.float32),
    }
    return per_pair, metrics

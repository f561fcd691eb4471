"""LoRA: add low-rank adapters to a loaded model, read them out, and fold them back into the weights.

    model = llama_jax.load(path)                                   # the frozen base
    model = lora.add_adapters(model, LoraSpec(rank=16, alpha=32, targets=("wq", "wk", "wv", "wo")))
    ...train: only `nnx.LoRAParam`s change (llama_jax/jobs/train.py)...
    merged = lora.merge(model)                                     # plain Llama: W + (alpha / rank) · A B
    llama_jax.jobs.convert / save merged as any other model

The adapters live beside the weights they adapt (`layers.attention.wq_lora.a`, `.b`; see
`llama_jax/model/linear.py` `LoRA`), stacked over layers like every layer weight, and carry logical axis
names, so they are sharded by the same rules (their rank axis, "lora_rank", is replicated).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.model.model import LORA_TARGETS, Llama, LoraSpec, abstract
from llama_jax.model.unstacked import Unstacked
from llama_jax.weights.placement import state_shardings

__all__ = ["LoraSpec", "LORA_TARGETS", "add_adapters", "adapter_state", "merge"]

# Which module of a block holds each adaptable projection.
_MODULE = {
    "wq": "attention",
    "wk": "attention",
    "wv": "attention",
    "wo": "attention",
    "w1": "feed_forward",
    "w2": "feed_forward",
    "w3": "feed_forward",
}


def _fresh(state: nnx.State) -> nnx.State:
    """New Variable objects over the same arrays: the new model shares memory, not mutations."""
    return jax.tree.map(lambda x: x, state)


def add_adapters(model: Llama, spec: LoraSpec, *, seed: int = 0) -> Llama:
    """A new `Llama` sharing `model`'s weights (no copy) with fresh adapters: A ~ N(0, 1/in), B = 0.

    The result computes exactly what `model` computes until the adapters are trained. On a mesh
    (`model.sharding`), the adapters are created directly in their sharded place.
    """
    if model.lora is not None:
        raise ValueError(f"the model already has adapters ({model.lora}); merge them first (lora.merge)")
    options = dataclasses.replace(model.options, lora=spec)
    graphdef, abstract_adapters, _ = nnx.split(abstract(model.config, model.dtype, options), nnx.LoRAParam, ...)
    shardings = None if model.sharding is None else state_shardings(abstract_adapters, model.sharding)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        # The base weights drawn here are dead code: XLA keeps only the adapters' initialisation.
        full = Llama(model.config, dtype=model.dtype, rngs=nnx.Rngs(seed), options=options)
        return nnx.state(full, nnx.LoRAParam)

    return nnx.merge(graphdef, init(), _fresh(nnx.state(model)))


def adapter_state(model: Llama) -> nnx.State:
    """The adapters only (`nnx.LoRAParam`s): what LoRA training updates and saves."""
    return nnx.state(model, nnx.LoRAParam)


@jax.jit
def _fold(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W [L, *in, *out] + scale · A [L, *in, R] B [L, R, *out], accumulated in float32, back in W's dtype."""
    delta = jax.vmap(lambda a1, b1: jnp.tensordot(a1, b1, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge(model: Llama) -> Llama:
    """A plain `Llama` (no adapters) whose adapted weights are W + (alpha / rank) · A B.

    Its logits equal the adapted model's up to the rounding of the merged weights to their dtype
    (exact in float32 up to summation order). Export it like any model (`llama_jax.jobs.convert`).
    """
    if model.lora is None:
        raise ValueError("the model has no adapters to merge")
    graphdef = nnx.graphdef(abstract(model.config, model.dtype, dataclasses.replace(model.options, lora=None)))
    merged = nnx.merge(graphdef, _fresh(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    for name in model.lora.targets:
        adapted = getattr(model.layers, _MODULE[name])
        adapter = getattr(adapted, f"{name}_lora")
        target = getattr(getattr(merged.layers, _MODULE[name]), name)
        target.set_value(_fold_held(getattr(adapted, name).get_value(), adapter.a[...], adapter.b[...], adapter.scale))
    return merged


def _fold_held(w, a: jax.Array, b: jax.Array, scale: float):
    """`_fold` of a weight as the model holds it: stacked, or `Unstacked` (folded layer by layer, kept so)."""
    if isinstance(w, Unstacked):
        return Unstacked(tuple(_fold(w[i][None], a[i : i + 1], b[i : i + 1], scale)[0] for i in range(len(w))))
    return _fold(w, a, b, scale)

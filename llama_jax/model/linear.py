"""A projection weight as the matmul sees it: plain, rowwise FP8 with its scale, LoRA-adapted, or fused.

The model's parameters stay plain `nnx.Param`s under Meta's names (`wq`, `w1`, `w1_scale`,
`wq_lora.a`): the paths loaders, the name map, FP8 `PATHS`, Orbax checkpoints and `lora.merge` read.
At call time each module reads them into these values, so a call site writes `w1("btd,df->btf", x)`
whatever the weight holds:

    Weight     one projection: `w`, and where the checkpoint has them an FP8 `scale` (`quant.fp8_linear`)
               and a LoRA `adapter` (x A B · alpha / rank, added to the product)
    Separate   projections of one input (wq, wk, wv; w1, w3), one dot each → a tuple
    Fused      the same as one weight concatenated along the first output axis, one dot, split after:
               the decode step's copy (`Separate.fused`, built by `decoding.layer_weights`)

All are pytrees (`jax.tree_util.register_dataclass`): a scan slices them, a jit returns them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.model import quant

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters (LoRA): each target projection W becomes W + (alpha / rank) · A B.

    targets: Meta names of the adapted projections, from `LORA_TARGETS`. A is initialised
    N(0, 1/in_features) and B at zero, so a fresh adapter leaves the model unchanged.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    dtype: str = "float32"  # adapter weights (trainable master copy); cast to the activation dtype in use

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@functools.partial(jax.tree_util.register_dataclass, data_fields=("a", "b"), meta_fields=("scale",))
@dataclasses.dataclass(frozen=True)
class Adapter:
    """The low-rank term of one projection whose weight is [*in, *out]: A [*in, R], B [R, *out]."""

    a: jax.Array
    b: jax.Array
    scale: float

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        """The low-rank term of `einsum(spec, x, W)`, computed as (x A) B with R in the middle."""
        operands, out = spec.split("->")
        x_sub, w_sub = operands.split(",")
        contracted = "".join(c for c in w_sub if c in x_sub)
        produced = "".join(c for c in w_sub if c not in x_sub)
        kept = "".join(c for c in x_sub if c not in w_sub)
        x_r = jnp.einsum(f"{x_sub},{contracted}r->{kept}r", x, self.a.astype(x.dtype))
        return jnp.einsum(f"{kept}r,r{produced}->{out}", x_r, self.b.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)


class LoRA(nnx.Module):
    """The adapter parameters of one projection whose weight is [*in, *out] (`nnx.LoRAParam`s `a`, `b`)."""

    def __init__(self, in_shape, out_shape, in_names, out_names, spec: LoraSpec, *, rngs: nnx.Rngs):
        init_a = nnx.initializers.normal(stddev=1.0 / math.prod(in_shape) ** 0.5)
        self.scale = spec.scale
        self.a = nnx.LoRAParam(
            init_a(rngs.params(), (*in_shape, spec.rank), spec.dtype),
            out_sharding=(*in_names, "lora_rank"),
            eager_sharding=False,
        )
        self.b = nnx.LoRAParam(
            jnp.zeros((spec.rank, *out_shape), spec.dtype), out_sharding=("lora_rank", *out_names), eager_sharding=False
        )

    def adapter(self) -> Adapter:
        return Adapter(self.a[...], self.b[...], self.scale)


def adapter_params(spec: LoraSpec | None, name: str, w: nnx.Param, n_in: int, rngs: nnx.Rngs) -> LoRA | None:
    """The `LoRA` of projection `name` (its first `n_in` axes are inputs), or None where `spec` skips it."""
    if spec is None or name not in spec.targets:
        return None
    names = w.get_metadata()["out_sharding"]
    return LoRA(w.shape[:n_in], w.shape[n_in:], names[:n_in], names[n_in:], spec, rngs=rngs)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("w", "scale", "adapter"), meta_fields=("fp8",))
@dataclasses.dataclass(frozen=True)
class Weight:
    """One projection: `einsum(spec, x, w)`, from FP8 when it has a `scale`, plus its adapter's term.

    scale: FP8 only, float32 per output channel of a 2-D `w` stored [out, in], the FP8 GEMM's layout
    (the matmul is `quant.fp8_linear`, run as `fp8.matmul` says); the einsum spec still names `w`
    input first. adapter: LoRA only.
    """

    w: jax.Array
    scale: jax.Array | None = None
    adapter: Adapter | None = None
    fp8: quant.Fp8Spec | None = None

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        if self.scale is None:
            y = _dot(spec, x, self.w)
        else:
            y = quant.fp8_linear(x, self.w, self.scale, mode=self.fp8.matmul, scale_ub=self.fp8.activation_scale_ub)
        return y if self.adapter is None else y + self.adapter(spec, x)

    @property
    def out_axis(self) -> int:
        """`w`'s first output axis: 1 (input first), 0 for FP8 (output first)."""
        return 1 if self.scale is None else 0


def _dot(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(spec, x, w)`; axes contracted together (x's last, w's first: wo's "btnh,nhd") run as one,
    `[B, T, N·H] × [N·H, D]`, bitcasts of both. Over two axes, XLA matched the attention output's
    layout by transposing the weight, every decode step."""
    (x_sub, w_sub), out = spec.split("->")[0].split(","), spec.split("->")[1]
    k = sum(c in x_sub for c in w_sub)
    if k < 2 or x_sub[-k:] != w_sub[:k]:
        return jnp.einsum(spec, x, w)
    merged = x_sub[-k]
    x, w = x.reshape(*x.shape[:-k], -1), w.reshape(-1, *w.shape[k:])
    return jnp.einsum(f"{x_sub[:-k]}{merged},{merged}{w_sub[k:]}->{out}", x, w)


def weight(module: nnx.Module, name: str, fp8: quant.Fp8Spec | None = None) -> Weight:
    """`module.<name>` with what the module holds beside it: `<name>_scale` (FP8), `<name>_lora` (LoRA)."""
    scale = getattr(module, f"{name}_scale", None)
    lora = getattr(module, f"{name}_lora", None)
    return Weight(
        getattr(module, name)[...],
        None if scale is None else scale[...],
        None if lora is None else lora.adapter(),
        fp8 if scale is not None else None,
    )


@functools.partial(jax.tree_util.register_dataclass, data_fields=("parts",), meta_fields=())
@dataclasses.dataclass(frozen=True)
class Separate:
    """Projections of one input, one dot each: `(wq, wk, wv)("btd,dch->btch", x)` → (q, k, v)."""

    parts: tuple[Weight, ...]

    def __call__(self, spec: str, x: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(part(spec, x) for part in self.parts)

    def fused(self) -> Fused:
        """The parts concatenated along their first output axis (FP8: with their scales): one dot."""
        parts, axis = self.parts, self.parts[0].out_axis
        w = jnp.concatenate([p.w for p in parts], axis=axis)
        scale = None if parts[0].scale is None else jnp.concatenate([p.scale for p in parts])
        sizes = tuple(p.w.shape[axis] for p in parts)
        return Fused(Weight(w, scale, None, parts[0].fp8), tuple(p.adapter for p in parts), sizes)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("weight", "adapters"), meta_fields=("sizes",))
@dataclasses.dataclass(frozen=True)
class Fused:
    """`Separate` as one weight concatenated along the first output axis (`sizes` each): one dot, then
    split; each part's adapter is added to its piece."""

    weight: Weight
    adapters: tuple[Adapter | None, ...]
    sizes: tuple[int, ...]

    def __call__(self, spec: str, x: jax.Array) -> tuple[jax.Array, ...]:
        # The first output axis of the product follows the input's kept axes.
        pieces = jnp.split(self.weight(spec, x), list(np.cumsum(self.sizes)[:-1]), axis=x.ndim - 1)
        return tuple(y if a is None else y + a(spec, x) for y, a in zip(pieces, self.adapters, strict=True))

"""Rowwise FP8 (float8_e4m3fn) quantization as FBGEMM does it, and matmuls that run from FP8 weights.

FBGEMM `quantize_fp8_per_row` (pytorch/FBGEMM `fbgemm_gpu/experimental/gen_ai/src/quantize/quantize.cu`,
`dynamicQuantizeMatrixRowwise`), for each row r (a weight's output channel, or a
token of activations):
    amax_r = max_j |x[r, j]|, capped at `scale_ub` when given (activations: 1200)
    s_r    = max(amax_r / 448, 1 / (448 * 512))     # the dequant multiplier that is stored
    q[r]   = fp8(clip(x[r] / s_r, -448, 448))
The clip matters: JAX and ml_dtypes casts do not saturate (465 -> nan); CUDA's conversion does.

Weights are kept in our layout, input dimension first ([D, F] for w1/w3, [F, D] for w2), so the
scale is per column of our weight: `scale[f]` multiplies output channel f.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
ACTIVATION_SCALE_UB = 1200.0


def quantize_rowwise_np(w: np.ndarray, scale_ub: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """numpy, torch layout [out, in] → (fp8 [out, in], float32 scale [out, 1]) as the FP8 release stores."""
    w32 = np.asarray(w, dtype=np.float32)
    amax = np.max(np.abs(w32), axis=1, keepdims=True)
    if scale_ub is not None:
        amax = np.minimum(amax, np.float32(scale_ub))
    scale = np.maximum(amax / np.float32(FP8_MAX), np.float32(MIN_SCALE)).astype(np.float32)
    q = np.clip(w32 / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def quantize_rows(x: jax.Array, scale_ub: float | None = None) -> tuple[jax.Array, jax.Array]:
    """jax, rows along the leading axes, channels last: x [..., K] → (fp8 [..., K], f32 scale [...])."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    if scale_ub is not None:
        amax = jnp.minimum(amax, scale_ub)
    scale = jnp.maximum(amax / FP8_MAX, MIN_SCALE)
    q = jnp.clip(x32 / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


def dequantize(w_q: jax.Array, scale: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Our layout: w_q [K, O] fp8, scale [O] → [K, O] in `dtype` (inside jit: fused into the matmul)."""
    return (w_q.astype(jnp.float32) * scale[None, :]).astype(dtype)


def fp8_linear(
    x: jax.Array, w_q: jax.Array, scale: jax.Array, *, mode: str = "dequant", scale_ub: float = ACTIVATION_SCALE_UB
) -> jax.Array:
    """x [..., K] @ (w_q [K, O] fp8 · scale [O]) → [..., O] in x.dtype.

    mode "dequant": upcast the weight inside the jitted computation (CPU; no bf16 copy of all
    weights is kept). mode "fp8": FBGEMM's `f8f8bf16_rowwise` — quantize activations per token
    (scale capped by `scale_ub`), an fp8×fp8 dot with float32 accumulation, then both scales;
    the form XLA can lower to FP8 tensor-core GEMMs on Hopper.
    """
    if mode == "dequant":
        return jnp.einsum("...k,ko->...o", x, dequantize(w_q, scale, x.dtype))
    if mode != "fp8":
        raise ValueError(f"fp8 matmul mode {mode!r}: expected 'dequant' or 'fp8'")
    x_q, x_scale = quantize_rows(x, scale_ub)
    y = jax.lax.dot_general(x_q, w_q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    w_scale = scale.reshape((1,) * (y.ndim - 1) + (-1,))
    return (y * x_scale[..., None] * w_scale).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Fp8Spec:
    """Which layers' FFNs hold rowwise-FP8 weights, and how their matmuls run.

    quantized_layers: layer indices whose w1/w3/w2 are FP8 (+ float32 scales); the others keep
      `dtype` weights in `Llama.dense_ffn` (the FP8 release skips layer 0 and the last layer).
    matmul: "dequant" (upcast inside jit; CPU) or "fp8" (per-token activation quantization and an
      fp8×fp8 dot, for Hopper).
    """

    quantized_layers: tuple[int, ...]
    matmul: str = "dequant"
    activation_scale_ub: float = ACTIVATION_SCALE_UB

    def __post_init__(self):
        if self.matmul not in ("dequant", "fp8"):
            raise ValueError(f"fp8 matmul {self.matmul!r}: expected 'dequant' or 'fp8'")

    def dense_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(i for i in range(n_layers) if i not in self.quantized_layers)

    def dense_slots(self, n_layers: int) -> tuple[int, ...]:
        """Per layer: its index into `Llama.dense_ffn`, or -1 when its FFN is FP8."""
        dense = self.dense_layers(n_layers)
        return tuple(dense.index(i) if i in dense else -1 for i in range(n_layers))

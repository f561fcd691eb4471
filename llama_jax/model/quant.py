"""Rowwise FP8 (float8_e4m3fn) quantization as FBGEMM does it, and matmuls that run from FP8 weights.

FBGEMM `quantize_fp8_per_row` (pytorch/FBGEMM `fbgemm_gpu/experimental/gen_ai/src/quantize/quantize.cu`,
`dynamicQuantizeMatrixRowwise`), for each row r (a weight's output channel, or a
token of activations):
    amax_r = max_j |x[r, j]|, capped at `scale_ub` when given (activations: 1200)
    s_r    = max(amax_r / 448, 1 / (448 * 512))     # the dequant multiplier that is stored
    q[r]   = fp8(clip(x[r] / s_r, -448, 448))
The clip matters: JAX and ml_dtypes casts do not saturate (465 -> nan); CUDA's conversion does.

FP8 weights are kept as the release stores them, output channel first ([F, D] for w1/w3, [D, F] for
w2; our bf16 weights are input first): the contracting dimension minor, the layout the FP8 GEMM
reads (cuBLASLt's FP8 GEMMs take both operands so, its "TN" layout; given input-first FP8 weights,
XLA's compiled H100 decode transposed them on every call). `scale[o]` multiplies output channel o.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
ACTIVATION_SCALE_UB = 1200.0
MODES = ("auto", "fp8", "dequant")
# "auto" multiplies products of fewer rows weight-only ("dequant"), larger ones as FP8 GEMMs: below
# it, bf16 compute on an H100 keeps up with reading the FP8 weight (docs/GPU.md).
FP8_GEMM_MIN_ROWS = 128
FP8_GEMM_PAD_ROWS = 2  # an "fp8" product has at least this many rows (`fp8_linear`)


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


def matmul_mode(mode: str, rows: int) -> str:
    """How a product of `rows` rows multiplies under `mode`: "auto" is "dequant" below `FP8_GEMM_MIN_ROWS`
    (decode: the compiled H100 step reads the same FP8 weight bytes either way, and the weight-only
    path adds no activation-quantization error), "fp8" from there (prefill: FP8 tensor-core throughput).
    docs/GPU.md has the compiled programs behind the choice."""
    if mode not in MODES:
        raise ValueError(f"fp8 matmul mode {mode!r}: expected one of {MODES}")
    if mode == "auto":
        return "dequant" if rows < FP8_GEMM_MIN_ROWS else "fp8"
    return mode


def fp8_linear(
    x: jax.Array, w_q: jax.Array, scale: jax.Array, *, mode: str = "dequant", scale_ub: float = ACTIVATION_SCALE_UB
) -> jax.Array:
    """x [..., K] @ (w_q [O, K] fp8 · scale [O])ᵀ → [..., O] in x.dtype.

    mode "dequant": the weight-only FP8 read, upcast inside the jitted computation, the product in
    x.dtype with float32 accumulation, then the weight's scale (no wider copy of the weight is kept).
    mode "fp8": FBGEMM's `f8f8bf16_rowwise` — quantize activations per token (scale capped by
    `scale_ub`), an fp8×fp8 dot with float32 accumulation, then both scales; the form XLA lowers to
    FP8 tensor-core GEMMs on Hopper. mode "auto": by the product's rows, as `matmul_mode` says.
    """
    rows = math.prod(x.shape[:-1])
    mode = matmul_mode(mode, rows)
    w_scale = scale.reshape((1,) * (x.ndim - 1) + (-1,))
    if mode == "dequant":
        # The scale multiplies the product, not the weight: the weight enters the dot as a bare convert,
        # which XLA's GPU compiler fuses into the GEMM (it reads FP8); scaled first, it is written out wide.
        y = jnp.einsum("...k,ok->...o", x, w_q.astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * w_scale).astype(x.dtype)
    x_q, x_scale = quantize_rows(x, scale_ub)
    x_q = x_q.reshape(rows, -1)
    if rows < FP8_GEMM_PAD_ROWS:
        # XLA's GPU compiler runs a one-row product as a matrix-vector dot with both FP8 operands
        # converted to f32; zero rows (dropped after) keep it an FP8 GEMM.
        x_q = jnp.pad(x_q, ((0, FP8_GEMM_PAD_ROWS - rows), (0, 0)))
    y = jax.lax.dot_general(x_q, w_q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    y = y[:rows].reshape(*x.shape[:-1], -1)
    return (y * x_scale[..., None] * w_scale).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Fp8Spec:
    """Which layers' FFNs hold rowwise-FP8 weights, and how their matmuls run.

    quantized_layers: layer indices whose w1/w3/w2 are FP8 (+ float32 scales); the others keep
      `dtype` weights in `Llama.dense_ffn` (the FP8 release skips layer 0 and the last layer).
    matmul: "dequant" (upcast inside jit; CPU), "fp8" (per-token activation quantization and an
      fp8×fp8 dot, for Hopper) or "auto" (by each product's rows: `matmul_mode`).
    """

    quantized_layers: tuple[int, ...]
    matmul: str = "dequant"
    activation_scale_ub: float = ACTIVATION_SCALE_UB

    def __post_init__(self):
        if self.matmul not in MODES:
            raise ValueError(f"fp8 matmul {self.matmul!r}: expected one of {MODES}")

    def dense_layers(self, n_layers: int) -> tuple[int, ...]:
        return tuple(i for i in range(n_layers) if i not in self.quantized_layers)

    def dense_slots(self, n_layers: int) -> tuple[int, ...]:
        """Per layer: its index into `Llama.dense_ffn`, or -1 when its FFN is FP8."""
        dense = self.dense_layers(n_layers)
        return tuple(dense.index(i) if i in dense else -1 for i in range(n_layers))

"""Rotary position embeddings with Llama 3.1's "llama3" frequency scaling.

The inverse frequencies are compile-time constants computed in numpy with the same float32
operations, in the same order, as Meta's `precompute_freqs_cis`/`apply_scaling` and HF's
`_compute_llama3_parameters`: at position 100,000 one ulp of difference in a frequency already moves
the angle by ~1e-2 rad, so "close" is not enough (tests/test_rope.py checks bit equality).

Weights use the Hugging Face "rotate-half" head layout (Meta checkpoints are permuted on load, see
`weights/layout.py`); the rotation itself runs in float32, as Meta's does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """`[H/2]` float32 inverse frequencies, llama3-scaled when `scaling` is given."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # torch's float32 `theta ** x` is correctly rounded here; float64 then rounding reproduces it.
    inv_freq = np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    if scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Keep high frequencies, divide low ones by `factor`, interpolate the band between.

    Mirrors torch's float32 arithmetic: `c / tensor` is evaluated as `reciprocal(tensor) * c`.
    """
    f32 = np.float32
    factor = f32(s.factor)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (f32(1.0) / inv_freq) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = ((f32(1.0) / wavelen) * f32(s.original_max_position_embeddings) - f32(s.low_freq_factor)) / f32(
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (f32(1.0) - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(in_band, smoothed, scaled).astype(np.float32)


def sin_cos(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions `[B, T]` int -> (sin, cos) `[B, T, H/2]` float32.

    The angle `position * inv_freq` is one float32 rounding, as in Meta's `torch.outer`.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x `[B, T, heads, H]`: rotate each head's halves (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin).

    Computed in float32 and cast back to x's dtype, as Meta's `apply_rotary_emb` does.
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)

"""Fused decode attention over the engine's page pool: the Pallas paged-attention kernels jax ships.

    out_bnh = paged_attention.decode(q_bnh, k_pool, v_pool, lengths_b, table_bm, kernel="triton", pages_per_block=4)

One query per row (a decode step) over the row's first `lengths_b[b]` cache entries, read page by page
through its page table straight from the pool: a row reads its own filled pages, in place, and no
gathered key block is written to HBM and read back (what the plain-JAX loop, `blockwise.cached`, costs).

Kernels (`KERNELS`; `attention.select_paged` picks one):
- "mosaic" (TPU): `jax.experimental.pallas.ops.tpu.paged_attention`, a Mosaic kernel that copies each
  row's pages into VMEM, double-buffered, `pages_per_block` pages at a time, up to the row's length.
- "triton" (NVIDIA GPUs): `jax.experimental.pallas.ops.gpu.paged_attention`, Pallas Triton: the row's
  page table is split into `k_splits` partitions run in parallel (split-K), each stopping at the row's
  length, their partial softmaxes combined by their running maxima.

Both take the pool kv-heads first, `[K, pages, page, H]`, so the engine lays its pool out as
`[K, L, P, page, H]` for them (`paged_cache.pool_shape`): layer i's page p is page i·P + p of the
`[K, L·P, page, H]` view (a reshape, free), and the kernel gets the page table offset by i·P rather than
a slice of the layer (a copy of the layer's whole pool). jax's `ragged_paged_attention` would serve the
same steps on TPU but wants K and V interleaved in one `[pages, page, 2K, H]` array; `paged_attention`
shares the GPU kernel's layout, so one pool layout serves both.

Neither kernel scales the scores: q is scaled by 1/√H first. On a CPU (tests), both run in Pallas
interpret mode.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_jax.model.platform import target as target_platform

KERNELS = ("mosaic", "triton")
MAX_K_SPLITS = 16  # the Triton kernel's default partitions of a row's pages


def decode(q_bnh, k_pool, v_pool, lengths_b, table_bm, *, kernel: str, pages_per_block: int) -> jax.Array:
    """Attention of one query per row `[B, N, H]` over its first lengths_b[b] entries → `[B, N, H]`.

    k_pool, v_pool: `[K, pages, page, H]`; table_bm: `[B, M]` int32 pages of the pool, row b's entry s being
    entry s % page of page table_bm[b, s // page]; M a multiple of pages_per_block.
    """
    h = q_bnh.shape[-1]
    q_bnh = (q_bnh.astype(jnp.float32) / math.sqrt(h)).astype(q_bnh.dtype)
    lengths_b = lengths_b.astype(jnp.int32)
    interpret = target_platform() == "cpu"
    if kernel == "mosaic":
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        def run():
            return paged_attention(q_bnh, k_pool, v_pool, lengths_b, table_bm, pages_per_compute_block=pages_per_block)

        if interpret:
            with pltpu.force_tpu_interpret_mode():
                return run()
        return run()
    if kernel == "triton":
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        return paged_attention(
            q_bnh,
            k_pool,
            v_pool,
            table_bm,
            lengths_b,
            pages_per_compute_block=pages_per_block,
            k_splits=k_splits(table_bm.shape[1], pages_per_block),
            interpret=interpret,
        )
    raise ValueError(f"paged attention kernel must be one of {KERNELS}, got {kernel!r}")


def k_splits(table_width: int, pages_per_block: int) -> int:
    """The Triton kernel's partitions of a row's M pages: the most, up to `MAX_K_SPLITS`, that cut the
    table into whole blocks of `pages_per_block` pages."""
    blocks = table_width // pages_per_block
    return max(n for n in range(1, min(MAX_K_SPLITS, blocks) + 1) if blocks % n == 0)

"""Fused decode attention: the Pallas kernels jax ships, over the engine's page pool and over a contiguous
cache's layer.

    out_bnh = paged_attention.decode(q_bnh, k_pool, v_pool, lengths_b, table_bm, kernel="triton", pages_per_block=4)
    out_bnh = paged_attention.contiguous(q_bnh, k_bksh, v_bksh, lengths_b)     # NVIDIA GPUs

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

On a mesh (`sharding.rules.active()`), a pool split over devices by kv heads alone (the tensor axis;
pages whole on every device) runs the kernel under `jax.shard_map`: each device over its own kv heads
and the query heads of their groups, with no communication (`head_split` says whether a pool is split
so; `attention.select_paged` picks the blockwise loop for any other split).

Neither kernel scales the scores: q is scaled by 1/√H first. On a CPU (tests), both run in Pallas
interpret mode.

`contiguous` (NVIDIA GPUs, `generate`'s decode step): `jax.experimental.pallas.ops.gpu.decode_attention`'s
split-K Triton kernel over a contiguous cache layer `[B, K, S, H]` as it lies. Each (row, kv head) pair's
`[S, H]` keys are cut into `k_splits` partitions run in parallel, each reading key blocks only up to the
row's length: a row's step reads its filled entries, not the cache's bucket (what the dense read costs),
and nothing is copied (the blockwise loop's key blocks are: a GPU GEMM takes whole buffers). jax's
`gqa` entry takes `[B, S, K, H]` and swaps it to `[B, K, S, H]` itself; it is handed the layer swapped,
and the compiler folds the two swaps away. On a mesh, under `jax.shard_map` over a layer split by rows
and kv heads alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llama_jax.model.attention import heads_follow
from llama_jax.model.platform import target as target_platform
from llama_jax.sharding import rules as sharding_rules

KERNELS = ("mosaic", "triton")
MAX_K_SPLITS = 16  # the Triton kernels' default partitions of a row's pages (keys)
DECODE_BLOCK_K = 128  # the contiguous Triton kernel's key block (`decode_attention.gqa`'s default)


def decode(q_bnh, k_pool, v_pool, lengths_b, table_bm, *, kernel: str, pages_per_block: int) -> jax.Array:
    """Attention of one query per row `[B, N, H]` over its first lengths_b[b] entries → `[B, N, H]`.

    k_pool, v_pool: `[K, pages, page, H]`; table_bm: `[B, M]` int32 pages of the pool, row b's entry s being
    entry s % page of page table_bm[b, s // page]; M a multiple of pages_per_block. On a mesh, under
    `jax.shard_map` over the pool's kv-head split (`head_split`).
    """
    run = functools.partial(_decode, kernel=kernel, pages_per_block=pages_per_block)
    active = sharding_rules.active_split()
    if active is None:
        return run(q_bnh, k_pool, v_pool, lengths_b, table_bm)
    mesh, rules = active
    split = head_split(mesh, rules, q_bnh.shape, k_pool.shape)
    if split is None:
        raise ValueError(f"paged attention kernel: the pool {k_pool.shape} is split otherwise than by kv heads alone")
    q_spec, pool_spec = split
    rows = PartitionSpec(q_spec[0])
    specs = (q_spec, pool_spec, pool_spec, rows, PartitionSpec(q_spec[0], None))
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
        q_bnh, k_pool, v_pool, lengths_b, table_bm
    )


def contiguous(q_bnh, k_bksh, v_bksh, lengths_b) -> jax.Array:
    """Attention of one query per row `[B, N, H]` over the first lengths_b[b] entries of its `[B, K, S, H]`
    layer (`contiguous_fits`), → `[B, N, H]`: the split-K Triton decode kernel (module doc)."""
    active = sharding_rules.active_split()
    if active is None:
        return _contiguous(q_bnh, k_bksh, v_bksh, lengths_b)
    mesh, rules = active
    split = layer_split(mesh, rules, q_bnh.shape, k_bksh.shape)
    if split is None:
        raise ValueError(f"decode attention kernel: cache layer {k_bksh.shape} split by more than rows and kv heads")
    q_spec, layer_spec = split
    specs = (q_spec, layer_spec, layer_spec, PartitionSpec(q_spec[0]))
    return jax.shard_map(_contiguous, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(
        q_bnh, k_bksh, v_bksh, lengths_b
    )


def contiguous_fits(kv_len: int, head_dim: int) -> bool:
    """Whether the Triton decode kernel's tiles fit a `kv_len`-entry layer of `head_dim`-wide heads."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and _tiles(kv_len) is not None


def layer_split(mesh, rules, q_shape, layer_shape) -> tuple[PartitionSpec, PartitionSpec] | None:
    """(q spec, layer spec) where the rules split a `[B, K, S, H]` cache layer over devices by rows and kv
    heads alone and the `[B, N, H]` queries the same way (rows; heads as the kv heads), each device then
    holding whole GQA groups of its rows; None where they split otherwise."""
    q_spec = sharding_rules.logical_to_spec(("batch", "q_heads", "head_dim"), rules, mesh=mesh, shape=q_shape)
    names = ("batch", "kv_heads", "cache_seq", "head_dim")
    layer_spec = sharding_rules.logical_to_spec(names, rules, mesh=mesh, shape=layer_shape)
    heads = heads_follow(q_spec[1], layer_spec[1], layer_shape[1], mesh)
    if layer_spec[2] or layer_spec[3] or q_spec[2] or layer_spec[0] != q_spec[0] or not heads:
        return None
    return q_spec, layer_spec


def _tiles(kv_len: int) -> tuple[int, int] | None:
    """(k_splits, block_k) of the Triton decode kernel over `kv_len` keys: key blocks of the largest power of
    two up to `DECODE_BLOCK_K` that divides kv_len (Triton's arrays are powers of two, at least 16), cut into
    the most partitions, up to `MAX_K_SPLITS`, of whole blocks. None where no such block divides kv_len."""
    block = next((b for b in (128, 64, 32, 16) if b <= DECODE_BLOCK_K and kv_len % b == 0), None)
    if block is None:
        return None
    blocks = kv_len // block
    return max(n for n in range(1, min(MAX_K_SPLITS, blocks) + 1) if blocks % n == 0), block


def _contiguous(q_bnh, k_bksh, v_bksh, lengths_b) -> jax.Array:
    from jax.experimental.pallas.ops.gpu import decode_attention

    swap = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # gqa swaps back: the compiler folds both
    k_splits, block_k = _tiles(k_bksh.shape[2])
    return decode_attention.gqa(
        q_bnh,
        swap(k_bksh),
        swap(v_bksh),
        kv_seq_len=lengths_b.astype(jnp.int32),
        block_k=block_k,
        k_splits=k_splits,
        interpret=target_platform() == "cpu",
    )


def head_split(mesh, rules, q_shape, pool_shape) -> tuple[PartitionSpec, PartitionSpec] | None:
    """(q spec, pool spec) where the rules split a `[K, pages, page, H]` pool over devices by its kv heads alone,
    and the `[B, N, H]` queries by the same axes on their heads (and any others on their rows): each device
    then holds whole GQA groups and every page of its heads. None where they split otherwise."""
    q_spec = sharding_rules.logical_to_spec(("batch", "q_heads", "head_dim"), rules, mesh=mesh, shape=q_shape)
    names = ("kv_heads", "batch", "cache_seq", "head_dim")
    pool_spec = sharding_rules.logical_to_spec(names, rules, mesh=mesh, shape=pool_shape)
    if any(pool_spec[1:]) or not heads_follow(q_spec[1], pool_spec[0], pool_shape[0], mesh):
        return None
    return q_spec, pool_spec


def pool_split(spec, config, slots: int, pool_shape) -> str:
    """How a kernel pool `[K, L, P, page, H]` of a model sharded by `spec` (a `ShardingSpec`, or None) is split
    over devices, for `attention.select_paged`: "none", "heads" (kv heads alone: `head_split`), or "other"."""
    if spec is None or spec.mesh.size == 1:
        return "none"
    k, n_layers, n_pages = pool_shape[:3]
    view = (k, n_layers * n_pages, *pool_shape[3:])  # what `decode` gets: `PagedKVCache.attend`'s view
    q = (slots, config.n_heads, config.head_dim)
    split = head_split(spec.mesh, spec.rules, q, view)
    pool = sharding_rules.logical_to_spec(
        ("kv_heads", "layers", "batch", "cache_seq", "head_dim"), spec.rules, mesh=spec.mesh, shape=pool_shape
    )
    if split is None or any(tuple(pool)[1:]):
        return "other"
    return "heads"


def _decode(q_bnh, k_pool, v_pool, lengths_b, table_bm, *, kernel: str, pages_per_block: int) -> jax.Array:
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

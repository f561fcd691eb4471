"""Blockwise attention in plain JAX: FlashAttention's online softmax over key blocks, and its backward.

    attention(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, block_q=.., block_k=..)

Key s is visible to query (b, t) when `s <= q_index_bt[b, t]` (and both carry the same segment id).
The queries go in tiles of `block_q`; a tile holds, for each kv head, its G query heads' rows stacked
(rows (g, q), `[B, K, G·block_q, H]`), so grouped-query attention is one dot per kv head and K/V
are never repeated. Each tile reads key blocks 0 .. the last one any of its queries sees (a dynamic
trip count): causal blocks are skipped, and a decode step reads the filled part of the cache, not
the bucket. The leading blocks every query of the tile sees in full run without a mask; only the
diagonal blocks (and every block, with segment ids) build one. Scores accumulate in float32.

The cache is read where it lies, `[B, S, K, H]` or kv-head-major `[B, K, S, H]` (`Keys.kv_major`, the
contiguous cache's layout): a key block is `dynamic_slice` of `block_k` consecutive entries of each
row, multiplied by dot dimension numbers that batch over (B, K) on both operands, so no transposed
copy of the cache is made here.

Block/page contract (the paged cache of the batch engine): key block j is entries
[j·block_k, (j+1)·block_k) of a row, so a page of `block_k` entries is exactly one key block and the
loop reads pages 0 .. ceil((max position + 1) / block_k) - 1 in order. Only when S is not a multiple
of block_k is the last block read from S - block_k (overlapping the one before, its already-counted
keys masked) instead of padding the cache; a paged cache, S = pages · block_k, never takes that path.

Backward (`jax.custom_vjp`): FlashAttention-2's. The forward saves its output and each row's
logsumexp (O(T)); the backward walks the same tiles and blocks again, recomputes each block's
probabilities from the logsumexp, and accumulates dQ per tile and dK, dV per key block: memory
O(block_q · block_k) per head on top of the inputs' own gradients, never O(T · S).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Key block: the cache page. The tile sizes here and below were chosen by measurement on CPU
# (benchmarks/results/blockwise_tiles_cpu.json).
DEFAULT_BLOCK_K = 512
DEFAULT_BLOCK_Q = 512

# A long contiguous cache is read in larger tiles (`cached_tiles`): with a dynamic trip count over
# hundreds of key blocks, fewer and larger blocks win; below 16K keys the page-sized tiles stay faster
# (benchmarks/results/blockwise_tiles_cpu.json).
LONG_CACHE = 16_384  # from here on: block_q 1024
LONGER_CACHE = 32_768  # from here on: block_k 1024 for query chunks
DECODE_BLOCK_K = 2_048  # a single query's key block over a long cache

_DOT_SCORES = (((3,), (3,)), ((0, 1), (0, 2)))  # [B, K, R, H] · [B, s, K, H] → [B, K, R, s]
_DOT_PV = (((3,), (1,)), ((0, 1), (0, 2)))  # [B, K, R, s] · [B, s, K, H] → [B, K, R, H]
_DOT_SCORES_KV_MAJOR = (((3,), (3,)), ((0, 1), (0, 1)))  # [B, K, R, H] · [B, K, s, H] → [B, K, R, s]
_DOT_PV_KV_MAJOR = (((3,), (2,)), ((0, 1), (0, 1)))  # [B, K, R, s] · [B, K, s, H] → [B, K, R, H]
_DOT_T = (((2,), (2,)), ((0, 1), (0, 1)))  # [B, K, R, s] · [B, K, R, H] → [B, K, s, H] (dK, dV)


def attention(
    q_btnh,
    k_bskh,
    v_bskh,
    q_index_bt,
    segment_q_bt=None,
    segment_kv_bs=None,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
) -> jax.Array:
    """softmax(q kᵀ / √H + visibility) v → `[B, T, N, H]` in q's dtype; a query that sees no key gets 0."""
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    return _attention(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, min(block_q, t), min(block_k, s))


@dataclasses.dataclass(frozen=True)
class Keys:
    """Where each row's keys and values lie: `read(j)` → (start, k, v) of key block j, k and v
    `[B, block, K, H]` (`kv_major`: `[B, K, block, H]`) holding key indices start .. start + block - 1
    (start = j·block except for an overlapping last block, see the module doc). `length` keys in
    all, `n_kv` kv heads."""

    read: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
    length: int
    block: int
    n_kv: int
    kv_major: bool = False

    @classmethod
    def contiguous(cls, k_bskh: jax.Array, v_bskh: jax.Array, block: int) -> Keys:
        """Key blocks of consecutive entries of `[B, S, K, H]` arrays."""
        return cls(
            lambda j: (*_block(k_bskh, j, block), _block(v_bskh, j, block)[1]), k_bskh.shape[1], block, k_bskh.shape[2]
        )


def cached_tiles(q_len: int, kv_len: int, block: int) -> tuple[int, int]:
    """(block_q, block_k) for queries over a contiguous cache of kv_len entries whose page is `block`:
    `(DEFAULT_BLOCK_Q, block)` up to `LONG_CACHE` entries, larger tiles beyond (measured above). block_k
    stays a multiple of `block`, so a key block is still whole pages."""
    if kv_len < LONG_CACHE:
        return DEFAULT_BLOCK_Q, block
    if q_len == 1:
        target = DECODE_BLOCK_K
    elif kv_len >= LONGER_CACHE:
        target = 2 * DEFAULT_BLOCK_K
    else:
        target = DEFAULT_BLOCK_K
    return 2 * DEFAULT_BLOCK_Q, max(1, target // block) * block


def cached(q_btnh, keys: Keys, q_index_bt, *, block_q: int = DEFAULT_BLOCK_Q) -> jax.Array:
    """`attention` over keys read block by block where they lie (a cache's layer, a paged pool): no copy
    of a layer is made, and only the blocks up to the furthest visible key are read. Inference only
    (its loops have dynamic trip counts, so it has no gradient)."""
    return _forward(q_btnh, keys, q_index_bt, None, None, min(block_q, q_btnh.shape[1]))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, q_index, seg_q, seg_kv, block_q, block_k):
    return _forward(q, Keys.contiguous(k, v, block_k), q_index, seg_q, seg_kv, block_q)[0]


# ---- tiles: [B, T, N, ...] ↔ [n_q, B, K, G·block_q, ...] -----------------------------------------------


def _tiles(x_btn_, n_kv: int, block_q: int, mode: str = "constant"):
    """`[B, T, N, *rest]` → `[n_q, B, K, G·block_q, *rest]`, rows (g, q); T padded up to whole tiles."""
    b, t, n, *rest = x_btn_.shape
    g, n_q = n // n_kv, -(-t // block_q)
    pad = [(0, 0), (0, n_q * block_q - t)] + [(0, 0)] * (x_btn_.ndim - 2)
    x = jnp.pad(x_btn_, pad, mode=mode).reshape(b, n_q, block_q, n_kv, g, *rest)
    x = jnp.moveaxis(x, (1, 3, 4), (0, 2, 3))  # [n_q, B, K, G, block_q, *rest]
    return x.reshape(n_q, b, n_kv, g * block_q, *rest)


def _untile(x, t: int, block_q: int):
    """The inverse of `_tiles` (padding rows dropped)."""
    n_q, b, n_kv, r, *rest = x.shape
    x = x.reshape(n_q, b, n_kv, r // block_q, block_q, *rest)
    x = jnp.moveaxis(x, (0, 2, 3), (1, 3, 4))  # [B, n_q, block_q, K, G, *rest]
    return x.reshape(b, n_q * block_q, n_kv * (r // block_q), *rest)[:, :t]


def _row_tiles(x_bt, g: int, block_q: int):
    """Per-query `[B, T]` ints → `[n_q, B, G·block_q]`, repeated for the G heads of a row tile. Padding rows
    copy the last query's (edge): they see what it sees, stay finite and are dropped."""
    b, t = x_bt.shape
    n_q = -(-t // block_q)
    x = jnp.pad(x_bt, ((0, 0), (0, n_q * block_q - t)), mode="edge").reshape(b, n_q, block_q)
    return jnp.tile(x.transpose(1, 0, 2), (1, 1, g))


# ---- the key loop ---------------------------------------------------------------------------------------


def _key_loop(index_br, s: int, block_k: int, segmented: bool, step, init):
    """Run `step(j, carry, masked)` over key blocks 0 .. the last any row sees; the leading blocks that every
    row sees in full (no segment ids, no overlapping last block) with masked=False, the rest masked."""
    n_k = -(-s // block_k)
    if n_k == 1:  # one key block (a short cache): no loop; a row that sees no key is masked to zeros
        return step(0, init, masked=True)
    trips = jnp.clip((jnp.max(index_br) + block_k) // block_k, 0, n_k)
    full = jnp.zeros((), trips.dtype)
    if not segmented:
        whole = n_k if s % block_k == 0 else n_k - 1
        full = jnp.clip((jnp.min(index_br) + 1) // block_k, 0, jnp.minimum(trips, whole))
    carry = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), init)
    return jax.lax.fori_loop(full, trips, functools.partial(step, masked=True), carry)


def _block(x_bskh, j, block_k: int):
    """Key block j, read from S - block_k when it would run past the end (see the module doc)."""
    start = jnp.minimum(j * block_k, x_bskh.shape[1] - block_k)
    return start, jax.lax.dynamic_slice_in_dim(x_bskh, start, block_k, axis=1)


def _scores(q_bkrh, start, k_block, j, index_br, segq_br, seg_kv_bs, masked: bool, kv_major: bool = False):
    """Block j's float32 scores `[B, K, R, block]` (q pre-scaled; keys from `start`), -inf where not visible."""
    block_k = k_block.shape[2 if kv_major else 1]
    dims = _DOT_SCORES_KV_MAJOR if kv_major else _DOT_SCORES
    scores = jax.lax.dot_general(q_bkrh, k_block, dims, preferred_element_type=jnp.float32)
    if not masked:
        return scores
    key = start + jnp.arange(block_k)
    ok_brs = (key[None, None, :] <= index_br[:, :, None]) & (key >= j * block_k)[None, None, :]
    if segq_br is not None:
        segk_bs = jax.lax.dynamic_slice_in_dim(seg_kv_bs, start, block_k, axis=1)
        ok_brs &= segq_br[:, :, None] == segk_bs[:, None, :]
    return jnp.where(ok_brs[:, None], scores, -jnp.inf)


# ---- forward ----------------------------------------------------------------------------------------------


def _prepare(q, n_kv, q_index, seg_q, block_q):
    h = q.shape[3]
    g = q.shape[2] // n_kv
    q_tiles = _tiles(q * jnp.asarray(1.0 / math.sqrt(h), q.dtype), n_kv, block_q)
    index_tiles = _row_tiles(q_index, g, block_q)
    seg_tiles = None if seg_q is None else _row_tiles(seg_q, g, block_q)
    return q_tiles, index_tiles, seg_tiles


def _forward(q, keys: Keys, q_index, seg_q, seg_kv, block_q):
    """→ (out `[B, T, N, H]`, logsumexp `[n_q, B, K, R]` float32; +inf for a row that sees no key)."""
    q_tiles, index_tiles, seg_tiles = _prepare(q, keys.n_kv, q_index, seg_q, block_q)

    def one_tile(args):
        q_bkrh, index_br, segq_br = args

        def step(j, carry, masked):
            m_bkr, l_bkr, acc_bkrh = carry
            start, k_block, v_block = keys.read(j)
            scores = _scores(q_bkrh, start, k_block, j, index_br, segq_br, seg_kv, masked, keys.kv_major)
            m_new = jnp.maximum(m_bkr, jnp.max(scores, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # no key seen yet: keep exp() finite
            p = jnp.exp(scores - m_safe[..., None])
            correction = jnp.exp(m_bkr - m_safe)
            pv_dims = _DOT_PV_KV_MAJOR if keys.kv_major else _DOT_PV
            pv = jax.lax.dot_general(p.astype(v_block.dtype), v_block, pv_dims, preferred_element_type=jnp.float32)
            return m_new, l_bkr * correction + jnp.sum(p, axis=-1), acc_bkrh * correction[..., None] + pv

        shape = q_bkrh.shape[:3]
        init = (
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_bkrh.shape, jnp.float32),
        )
        m_bkr, l_bkr, acc_bkrh = _key_loop(index_br, keys.length, keys.block, segq_br is not None, step, init)
        seen = l_bkr > 0
        out = acc_bkrh / jnp.where(seen, l_bkr, 1.0)[..., None]
        return out.astype(q.dtype), jnp.where(seen, m_bkr + jnp.log(jnp.where(seen, l_bkr, 1.0)), jnp.inf)

    if q_tiles.shape[0] == 1:
        out, lse = jax.tree.map(
            lambda x: x[None], one_tile(jax.tree.map(lambda x: x[0], (q_tiles, index_tiles, seg_tiles)))
        )
    else:
        out, lse = jax.lax.map(one_tile, (q_tiles, index_tiles, seg_tiles))
    return _untile(out, q.shape[1], block_q), lse


# ---- backward (FlashAttention-2) --------------------------------------------------------------------------


def _fwd(q, k, v, q_index, seg_q, seg_kv, block_q, block_k):
    out, lse = _forward(q, Keys.contiguous(k, v, block_k), q_index, seg_q, seg_kv, block_q)
    return out, (q, k, v, q_index, seg_q, seg_kv, out, lse)


def _bwd(block_q, block_k, residuals, d_out):
    q, k, v, q_index, seg_q, seg_kv, out, lse = residuals
    b, s, n_kv, h = k.shape
    q_tiles, index_tiles, seg_tiles = _prepare(q, n_kv, q_index, seg_q, block_q)
    do_tiles = _tiles(d_out, n_kv, block_q)
    # D = rowsum(dO ∘ O): the softmax's Jacobian term, one float per query row.
    delta_tiles = _tiles(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), n_kv, block_q)

    def one_tile(i, carry):
        dq_tiles, dk_bksh, dv_bksh = carry
        q_bkrh, do_bkrh, index_br, lse_bkr, delta_bkr = (
            x[i] for x in (q_tiles, do_tiles, index_tiles, lse, delta_tiles)
        )
        segq_br = None if seg_tiles is None else seg_tiles[i]

        def step(j, carry, masked):
            dq_bkrh, dk_bksh, dv_bksh = carry
            start, k_block = _block(k, j, block_k)
            _, v_block = _block(v, j, block_k)
            scores = _scores(q_bkrh, start, k_block, j, index_br, segq_br, seg_kv, masked)
            p = jnp.exp(scores - lse_bkr[..., None])  # the forward's probabilities, recomputed
            dv_block = jax.lax.dot_general(p, do_bkrh.astype(jnp.float32), _DOT_T)
            dp = jax.lax.dot_general(do_bkrh, v_block, _DOT_SCORES, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_bkr[..., None])
            dq_bkrh = dq_bkrh + jax.lax.dot_general(ds, k_block.astype(jnp.float32), _DOT_PV)
            dk_block = jax.lax.dot_general(ds, q_bkrh.astype(jnp.float32), _DOT_T)

            def add(acc_bksh, block_bksh):
                old = jax.lax.dynamic_slice_in_dim(acc_bksh, start, block_k, axis=2)
                return jax.lax.dynamic_update_slice_in_dim(acc_bksh, old + block_bksh, start, axis=2)

            return dq_bkrh, add(dk_bksh, dk_block), add(dv_bksh, dv_block)

        init = (jnp.zeros(q_bkrh.shape, jnp.float32), dk_bksh, dv_bksh)
        dq_bkrh, dk_bksh, dv_bksh = _key_loop(index_br, s, block_k, segq_br is not None, step, init)
        return dq_tiles.at[i].set(dq_bkrh), dk_bksh, dv_bksh

    init = (
        jnp.zeros(q_tiles.shape, jnp.float32),
        jnp.zeros((b, n_kv, s, h), jnp.float32),
        jnp.zeros((b, n_kv, s, h), jnp.float32),
    )
    dq_tiles, dk_bksh, dv_bksh = jax.lax.fori_loop(0, q_tiles.shape[0], one_tile, init)
    dq = (_untile(dq_tiles, q.shape[1], block_q) / math.sqrt(h)).astype(q.dtype)
    dk, dv = (x.transpose(0, 2, 1, 3) for x in (dk_bksh, dv_bksh))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_attention.defvjp(_fwd, _bwd)

"""Attention: one function, `attend`, with backends behind it and one selection rule, `select`.

    attend(q_btnh, k_bskh, v_bskh, q_index_bt, backend="auto")

The one semantics every backend implements: key s is visible to query (b, t) when
`s <= q_index_bt[b, t]` (and, with segment ids, when both are in the same segment). That covers the
uncached causal forward (q_index = 0..T-1), a prefill chunk at an offset into the cache, and a decode
step (q_index = each row's own position: ragged rows need no offsets, since cache entry s holds
position s). Grouped-query attention is native everywhere: N query heads share K kv heads, query
head n uses kv head n // G, and K/V are never repeated.

Backends (`BACKENDS`):
- "dense": `jax.nn.dot_product_attention(implementation="xla")` with an explicit mask, the readable
  reference the others are tested against. Materialises the `[B, N, T, S]` scores.
- "blockwise": online softmax over key blocks in plain JAX (Rabe & Staats; FlashAttention's
  recurrence). Queries go in blocks of `block`, each reading key blocks only up to the furthest key
  any of its queries may see (a dynamic trip count): causal blocks are skipped, and a decode step reads
  the filled part of the cache, not the bucket. Peak memory O(B·N·block²). Exact to fp32 rounding.
  Forward-only loops (`while_loop`); its gradient is the dense reference's (`custom_vjp`), so training
  through it is correct but not memory-efficient.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs, bf16/fp16 only.
  Queries at key index 0 (no offset, the uncached forward) run its causal mask with sequence lengths;
  an offset chunk passes the visibility mask.
- "splash": `jax.experimental.pallas.ops.tpu.splash_attention` on TPU, for queries at key index 0
  (its causal mask is static): vmapped over batch and kv heads as an MQA kernel, segment ids native.

`select("auto", ...)`: TPU → splash when its static causal mask fits (queries start at key 0, lengths
multiples of 128), GPU → cudnn in bf16/fp16 for multi-token queries (at an offset only while its
boolean mask stays under the budget), CPU → blockwise; everything else → dense
while the score matrix fits `DENSE_BUDGET_BYTES`, blockwise beyond. The choice is logged.

Key blocks are `block` consecutive cache entries of one row: the unit a paged cache would hand over
as a page (`block` = page size), so a paged KV cache can feed this loop without a gather of the row.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.platform import target as target_platform

BACKENDS = ("auto", "dense", "blockwise", "cudnn", "splash")
DEFAULT_BLOCK = 512
# The dense backend is chosen by "auto" only while its float32 score matrix stays under this.
DENSE_BUDGET_BYTES = 256 * 2**20

log = logging.getLogger(__name__)


def select(
    requested: str,
    *,
    platform: str,
    dtype,
    q_len: int,
    kv_len: int,
    batch: int = 1,
    n_heads: int = 1,
    q_offset: bool = True,
    segments: bool = False,
    budget_bytes: int = DENSE_BUDGET_BYTES,
) -> str:
    """The backend `attend` runs. `requested` is one of `BACKENDS`; anything but "auto" is checked
    (cudnn needs a GPU and bf16/fp16, splash a TPU and queries at key 0) and returned as is.

    q_offset: whether queries may sit at a key index other than their own (a cache; False for the
    uncached forward). segments: packed documents (segment ids).
    """
    if requested not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {requested!r}")
    dtype = jnp.dtype(dtype)
    if requested == "cudnn":
        if platform != "gpu" and platform != "cuda":
            raise ValueError(f"attention='cudnn' needs an NVIDIA GPU, this platform is {platform!r}")
        if dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"attention='cudnn' supports bfloat16 and float16 only, got {dtype}: "
                "load the model in bfloat16 or pick attention='blockwise'/'dense'"
            )
        if segments:
            raise ValueError("attention='cudnn' does not take packed segment ids here: use 'blockwise'")
    if requested == "splash":
        if platform != "tpu":
            raise ValueError(f"attention='splash' needs a TPU, this platform is {platform!r}")
        if q_offset:
            raise ValueError(
                "attention='splash' has a static causal mask: it runs the uncached forward (queries at key 0), "
                "not a cache; use 'blockwise' for prefill chunks and decode"
            )
    choice = requested
    if requested == "auto":
        dense_bytes = 4 * batch * n_heads * q_len * kv_len
        if platform == "tpu" and not q_offset and q_len % 128 == 0 and kv_len % 128 == 0:
            choice = "splash"
        elif (platform in ("gpu", "cuda") and dtype in (jnp.bfloat16, jnp.float16) and q_len > 1 and not segments
              and (not q_offset or batch * q_len * kv_len <= budget_bytes)):  # fmt: skip
            # At an offset cuDNN takes an explicit [B, 1, T, S] boolean mask: only while that stays small.
            choice = "cudnn"
        elif platform == "cpu" or dense_bytes > budget_bytes:
            choice = "blockwise"
        else:
            choice = "dense"
    log.info("attention: %s (requested %s; %s, %s, T=%d, S=%d)", choice, requested, platform, dtype, q_len, kv_len)
    return choice


def visible(q_index_bt, kv_len: int, segment_q_bt=None, segment_kv_bs=None) -> jax.Array:
    """The `[B, T, S]` boolean mask every backend implements (dense materialises it)."""
    mask = jnp.arange(kv_len)[None, None, :] <= q_index_bt[:, :, None]
    if segment_q_bt is not None:
        mask &= segment_q_bt[:, :, None] == segment_kv_bs[:, None, :]
    return mask


def attend(
    q_btnh: jax.Array,
    k_bskh: jax.Array,
    v_bskh: jax.Array,
    q_index_bt: jax.Array,
    *,
    segment_q_bt: jax.Array | None = None,
    segment_kv_bs: jax.Array | None = None,
    backend: str = "auto",
    block: int = DEFAULT_BLOCK,
    q_offset: bool = True,
) -> jax.Array:
    """softmax(q kᵀ / √H + mask) v over the visible keys → `[B, T, N, H]` in q's dtype.

    q_index_bt: each query's key index (its position in a cache; 0..T-1 for the uncached forward).
    segment_q_bt / segment_kv_bs: packed documents; a query sees only keys of its own segment.
    q_offset: False promises q_index_bt == 0..T-1 for every row (lets cudnn/splash use a causal mask).
    A query that sees no key (a padding row) gets zeros from blockwise, whatever from the others.
    """
    b, t, n, _ = q_btnh.shape
    s = k_bskh.shape[1]
    segments = segment_q_bt is not None
    backend = select(backend, platform=target_platform(), dtype=q_btnh.dtype, q_len=t, kv_len=s, batch=b,
                     n_heads=n, q_offset=q_offset, segments=segments)  # fmt: skip
    if backend == "dense":
        mask = visible(q_index_bt, s, segment_q_bt, segment_kv_bs)[:, None]
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, implementation="xla")
    if backend == "cudnn":
        return _cudnn(q_btnh, k_bskh, v_bskh, q_index_bt, q_offset)
    if backend == "splash":
        return _splash(q_btnh, k_bskh, v_bskh, segment_q_bt, segment_kv_bs)
    return blockwise(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, min(block, t), min(block, s))


# ---- blockwise: online softmax over key blocks ------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def blockwise(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, block_q: int, block_k: int):
    """The "blockwise" backend (see the module doc); all arguments required, block sizes static."""
    return _blockwise(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, block_q, block_k)


def _blockwise(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, block_q, block_k):
    b, t, n, h = q_btnh.shape
    s, k = k_bskh.shape[1], k_bskh.shape[2]
    g = n // k
    n_q, n_k = -(-t // block_q), -(-s // block_k)
    pad = n_q * block_q - t
    # Queries: [n_q, B, block_q, K, G, H] blocks (padding queries see no key: index -1).
    q_blocks = jnp.pad(q_btnh, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n_q, block_q, k, g, h)
    q_blocks = q_blocks.transpose(1, 0, 2, 3, 4, 5) * jnp.asarray(1.0 / math.sqrt(h), q_btnh.dtype)
    index_blocks = jnp.pad(q_index_bt, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n_q, block_q)
    # Without segment ids every query is in segment 0 (the mask then never reads them).
    segq_bt = jnp.zeros((b, t), jnp.int32) if segment_q_bt is None else segment_q_bt
    segq_blocks = jnp.pad(segq_bt, ((0, 0), (0, pad))).reshape(b, n_q, block_q)

    def one_q_block(args):
        q_bqkgh, index_bq, segq_bq = args
        # Key blocks 0 .. last one any of these queries sees: the causal/length-aware trip count.
        trips = jnp.clip((jnp.max(index_bq) + block_k) // block_k, 0, n_k)

        def body(j, carry):
            m_bkgq, l_bkgq, acc_bkgqh = carry
            # The last block may overlap the one before when S % block_k != 0: it is read from S - block_k
            # and the keys already counted (index < j * block_k) are masked, so the cache is never padded.
            start = jnp.minimum(j * block_k, s - block_k)
            k_bskh_j = jax.lax.dynamic_slice_in_dim(k_bskh, start, block_k, axis=1)
            v_bskh_j = jax.lax.dynamic_slice_in_dim(v_bskh, start, block_k, axis=1)
            scores = jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh_j, preferred_element_type=jnp.float32)

            def masked(scores):
                key_index = start + jnp.arange(block_k)
                ok_bqs = key_index[None, None, :] <= index_bq[:, :, None]
                ok_bqs &= (key_index >= j * block_k)[None, None, :]
                if segment_q_bt is not None:
                    segk_bs = jax.lax.dynamic_slice_in_dim(segment_kv_bs, start, block_k, axis=1)
                    ok_bqs &= segq_bq[:, :, None] == segk_bs[:, None, :]
                return jnp.where(ok_bqs[:, None, None], scores, -jnp.inf)

            # Interior blocks (every key before every query, no overlap, one document) skip the mask.
            interior = (start + block_k - 1 <= jnp.min(index_bq)) & (start == j * block_k) & (segment_q_bt is None)
            scores = masked(scores) if n_k == 1 else jax.lax.cond(interior, lambda x: x, masked, scores)
            m_new = jnp.maximum(m_bkgq, jnp.max(scores, axis=-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # no key seen yet: keep exp() finite
            p = jnp.exp(scores - m_safe[..., None])
            correction = jnp.exp(m_bkgq - m_safe)
            l_new = l_bkgq * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_bskh.dtype), v_bskh_j, preferred_element_type=jnp.float32)
            return m_new, l_new, acc_bkgqh * correction[..., None] + pv

        shape = (b, k, g, block_q)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, h), jnp.float32))  # fmt: skip
        if n_k == 1:  # one key block (a short cache): no loop; a query that sees no key is masked to zeros
            _, l_bkgq, acc_bkgqh = body(0, init)
        else:
            _, l_bkgq, acc_bkgqh = jax.lax.fori_loop(0, trips, body, init)
        out = acc_bkgqh / jnp.where(l_bkgq == 0, 1.0, l_bkgq)[..., None]
        return out.transpose(0, 3, 1, 2, 4).astype(q_btnh.dtype)  # [B, block_q, K, G, H]

    if n_q == 1:
        out = one_q_block((q_blocks[0], index_blocks[:, 0], segq_blocks[:, 0]))[None]
    else:
        out = jax.lax.map(one_q_block, (q_blocks, index_blocks.transpose(1, 0, 2), segq_blocks.transpose(1, 0, 2)))
    return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, n_q * block_q, n, h)[:, :t]


def _dense_reference(q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs):
    mask = visible(q_index_bt, k_bskh.shape[1], segment_q_bt, segment_kv_bs)[:, None]
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, implementation="xla")


def _blockwise_fwd(q, k, v, q_index, seg_q, seg_kv, block_q, block_k):
    return _blockwise(q, k, v, q_index, seg_q, seg_kv, block_q, block_k), (q, k, v, q_index, seg_q, seg_kv)


def _blockwise_bwd(block_q, block_k, residuals, d_out):
    # The gradient of the same function, taken through the dense reference (O(T·S) memory).
    q, k, v, q_index, seg_q, seg_kv = residuals
    _, vjp = jax.vjp(lambda q, k, v: _dense_reference(q, k, v, q_index, seg_q, seg_kv), q, k, v)
    return (*vjp(d_out), None, None, None)


blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---- fused kernels -----------------------------------------------------------------------------------


def _cudnn(q_btnh, k_bskh, v_bskh, q_index_bt, q_offset: bool):
    kv_lengths = (jnp.max(q_index_bt, axis=1) + 1).astype(jnp.int32)
    if not q_offset:  # queries at key 0: cuDNN's own (top-left) causal mask, no [T, S] mask tensor
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, is_causal=True,
                                            key_value_seq_lengths=kv_lengths, implementation="cudnn")  # fmt: skip
    mask = visible(q_index_bt, k_bskh.shape[1])[:, None]
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, key_value_seq_lengths=kv_lengths,
                                        implementation="cudnn")  # fmt: skip


def _splash(q_btnh, k_bskh, v_bskh, segment_q_bt, segment_kv_bs):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q_btnh.shape
    s, k = k_bskh.shape[1], k_bskh.shape[2]
    g = n // k
    mask = masks.MultiHeadMask([masks.CausalMask((t, s))] * g)
    kernel = kernels.make_splash_mqa_single_device(mask=mask)  # one kv head serves its G query heads
    q_bkgth = (q_btnh * jnp.asarray(1.0 / math.sqrt(h), q_btnh.dtype)).reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4)
    k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)

    def one_row(q_kgth, k_ksh, v_ksh, seg_q_t, seg_kv_s):
        segment_ids = None if seg_q_t is None else kernels.SegmentIds(q=seg_q_t, kv=seg_kv_s)
        return jax.vmap(lambda q, k_, v: kernel(q, k_, v, segment_ids=segment_ids))(q_kgth, k_ksh, v_ksh)

    out_bkgth = jax.vmap(one_row)(q_bkgth, k_bksh, v_bksh, segment_q_bt, segment_kv_bs)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


def dense_score_bytes(batch: int, n_heads: int, q_len: int, kv_len: int) -> int:
    """What the dense backend's float32 score matrix would take."""
    return int(np.prod([4, batch, n_heads, q_len, kv_len], dtype=np.int64))

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
  reference the others are tested against. Materialises the `[B, N, T, S]` scores. Over a cache's
  kv-head-major `[B, K, S, H]` layer, `dense_kv_major` is the same math with dots that read it in place.
- "blockwise": online softmax over key blocks in plain JAX (Rabe & Staats; FlashAttention's
  recurrence). Queries go in blocks of `block`, each reading key blocks only up to the furthest key
  any of its queries may see (a dynamic trip count): causal blocks are skipped, and a decode step reads
  the filled part of the cache, not the bucket. Peak memory O(B·N·block²). Exact to fp32 rounding.
  Its gradient is FlashAttention-2's backward (`custom_vjp`, `llama_jax/model/blockwise.py`): O(T) saved,
  never the score matrix. A cache (`KVCache.attend`, the engine's pages) feeds it key blocks read in
  place (`blockwise.cached`).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs, bf16/fp16 only.
  Queries at key index 0 (no offset, the uncached forward) run its causal mask with sequence lengths;
  an offset chunk passes the visibility mask.
- "splash": `jax.experimental.pallas.ops.tpu.splash_attention` on TPU, for queries at key index 0
  (its causal mask is static): vmapped over batch and kv heads as an MQA kernel, segment ids native.

`select("auto", ...)`: TPU → splash when its static causal mask fits (queries start at key 0, lengths
multiples of 128), GPU → cudnn in bf16/fp16 for multi-token queries (at an offset only while its
boolean mask stays under the budget), CPU → blockwise; a decode step (one query per row, over a cache)
on a GPU in bf16/fp16 → "triton", the split-K decode kernel over the cache's layer where the cache says
it serves it (`KVCache.attend`: `paged_attention.contiguous`), which reads each row's filled keys, not the
cache's bucket. Everything else (a TPU's decode step among them: the blockwise loop there made libtpu
compile 8B on v5e-8 at batch 8 for over 10 minutes, docs/TARGETS.md) → dense while the score matrix fits
`DENSE_BUDGET_BYTES`, blockwise beyond. The choice is logged. "triton" is chosen, never requested:
`--attention dense` or `blockwise` overrides it.

`select_paged(requested, ...)`: the engine's paged KV cache (batch and rejection jobs) decodes with a
Pallas paged-attention kernel (`llama_jax/model/paged_attention.py`) on one TPU ("mosaic") or one NVIDIA GPU
("triton", bf16/fp16) where its tiles fit the model, and with the blockwise loop elsewhere (CPU,
sharded pools) and for every prefill chunk; "blockwise" forces the loop. dense, cudnn and splash cannot
serve a paged cache: the engine rejects them, naming `--attention`. The choice is logged.

Key blocks are `block` consecutive cache entries of one row: the unit a paged cache hands over as
pages (`block` = a multiple of the page size), so the engine's paged KV cache feeds the same loop.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llama_jax.model import blockwise
from llama_jax.model.platform import target as target_platform
from llama_jax.sharding import rules as sharding_rules

BACKENDS = ("auto", "dense", "blockwise", "cudnn", "splash")
DEFAULT_BLOCK = blockwise.DEFAULT_BLOCK_K  # the key block (a paged cache's page)
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
    kernel_fits: bool = False,
) -> str:
    """The backend `attend` runs. `requested` is one of `BACKENDS`; anything but "auto" is checked
    (cudnn needs a GPU and bf16/fp16, splash a TPU and queries at key 0) and returned as is.

    q_offset: whether queries may sit at a key index other than their own (a cache; False for the
    uncached forward). segments: packed documents (segment ids). kernel_fits: whether the platform's
    fused kernel can run this call on its arrays as the active mesh splits them: splash in `attend`
    (`splash_split`), the GPU decode kernel over a cache layer in `KVCache.attend`.
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
        gpu_half = platform in ("gpu", "cuda") and dtype in (jnp.bfloat16, jnp.float16)
        if platform == "tpu" and not q_offset and q_len % 128 == 0 and kv_len % 128 == 0 and kernel_fits:
            choice = "splash"
        elif q_len == 1 and q_offset and not segments and gpu_half and kernel_fits:
            choice = "triton"  # a decode step: reads each row's filled keys in place
        elif gpu_half and q_len > 1 and not segments and (not q_offset or batch * q_len * kv_len <= budget_bytes):
            # At an offset cuDNN takes an explicit [B, 1, T, S] boolean mask: only while that stays small.
            choice = "cudnn"
        elif platform == "cpu" or dense_bytes > budget_bytes:
            choice = "blockwise"
        else:
            choice = "dense"
    if platform == "tpu" and requested == "auto" and q_offset and q_len > 1:
        # Splash's mask is static (numpy, built at trace time); a prefill chunk's offset is a traced value.
        log.info("attention: splash not used: queries at a traced offset into the cache (a prefill chunk)")
    log.info("attention: %s (requested %s; %s, %s, T=%d, S=%d)", choice, requested, platform, dtype, q_len, kv_len)
    return choice


PAGED_BACKENDS = ("auto", "blockwise")  # what the engine's paged cache accepts


def check_paged(requested: str) -> None:
    """Raise unless `requested` can serve the engine's paged KV cache (before any model is loaded)."""
    if requested not in PAGED_BACKENDS:
        raise ValueError(
            f"--attention {requested}: the engine's paged KV cache (batch and rejection jobs) cannot run it; "
            "use auto (a Pallas paged-attention kernel on TPU and GPU, blockwise on CPU) or blockwise"
        )


def select_paged(requested: str, *, platform: str, dtype, head_dim: int, page: int, block_pages: int, split: str):
    """The attention the engine's paged cache decodes with: "blockwise", or a `paged_attention.KERNELS` kernel.

    "auto": "mosaic" on a TPU, "triton" on an NVIDIA GPU in bf16/fp16, when the pool sits on one device or
    is split over devices by kv heads alone (`split`: "none", "heads" or "other", `paged_attention.head_split`)
    and the kernel's tiles fit (TPU: head_dim a multiple of 128 and whole bf16 tiles per page; GPU:
    head_dim and the key block `page · block_pages` powers of two of at least 16); "blockwise" otherwise.
    """
    check_paged(requested)
    dtype = jnp.dtype(dtype)
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731
    choice, why = "blockwise", "requested"
    if requested == "auto":
        why = f"{platform}, pool split: {split}, {dtype}, head_dim {head_dim}, page {page}"
        if split != "other" and platform == "tpu" and head_dim % 128 == 0 and page % 16 == 0:
            choice = "mosaic"
        elif (
            split != "other"
            and platform in ("gpu", "cuda")
            and dtype in (jnp.bfloat16, jnp.float16)
            and pow2(head_dim)
            and pow2(page * block_pages)
        ):
            choice = "triton"
    log.info("attention (paged decode): %s (requested %s; %s)", choice, requested, why)
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
    block_q: int = blockwise.DEFAULT_BLOCK_Q,
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
    split = splash_split(q_btnh.shape, k_bskh.shape)
    if backend == "splash" and split is None:
        raise ValueError(
            "attention='splash': the active mesh splits the sequence or head_dim, or the query heads otherwise "
            "than their kv heads; splash runs per device over whole sequences and GQA groups: use 'blockwise'"
        )
    backend = select(
        backend,
        platform=target_platform(),
        dtype=q_btnh.dtype,
        q_len=t,
        kv_len=s,
        batch=b,
        n_heads=n,
        q_offset=q_offset,
        segments=segments,
        kernel_fits=split is not None,
    )
    if backend == "dense":
        mask = visible(q_index_bt, s, segment_q_bt, segment_kv_bs)[:, None]
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, implementation="xla")
    if backend == "cudnn":
        return _cudnn(q_btnh, k_bskh, v_bskh, q_index_bt, q_offset)
    if backend == "splash":
        return _splash(q_btnh, k_bskh, v_bskh, segment_q_bt, segment_kv_bs, split)
    return blockwise.attention(
        q_btnh, k_bskh, v_bskh, q_index_bt, segment_q_bt, segment_kv_bs, block_q=block_q, block_k=block
    )


def dense_kv_major(q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, q_index_bt: jax.Array) -> jax.Array:
    """The dense backend over keys and values laid out `[B, K, S, H]` (the contiguous KV cache's layer):
    both dots batch over (B, K) and contract H, then S, of a (b, k) pair's `[S, H]` matrix as it lies,
    so neither K nor V is transposed or copied. Same math as "dense": float32 scores and softmax,
    the probabilities cast to V's dtype for the second dot."""
    b, t, n, h = q_btnh.shape
    k = k_bksh.shape[1]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q_btkgh, k_bksh, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(1.0 / math.sqrt(h))
    mask_bts = visible(q_index_bt, k_bksh.shape[2])
    scores = jnp.where(mask_bts[:, None, None], scores, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksh.dtype)
    out_btkgh = jnp.einsum("bkgts,bksh->btkgh", probs, v_bksh)
    return out_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


# ---- fused kernels -----------------------------------------------------------------------------------


def _cudnn(q_btnh, k_bskh, v_bskh, q_index_bt, q_offset: bool):
    kv_lengths = (jnp.max(q_index_bt, axis=1) + 1).astype(jnp.int32)
    if not q_offset:  # queries at key 0: cuDNN's own (top-left) causal mask, no [T, S] mask tensor
        return jax.nn.dot_product_attention(
            q_btnh, k_bskh, v_bskh, is_causal=True, key_value_seq_lengths=kv_lengths, implementation="cudnn"
        )
    mask = visible(q_index_bt, k_bskh.shape[1])[:, None]
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask, key_value_seq_lengths=kv_lengths, implementation="cudnn"
    )


def splash_split(q_shape, kv_shape) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec] | None:
    """How splash runs over the active mesh (`sharding.rules.active()`): (q, k/v, segment ids) specs of its
    `[B, T, N, H]`, `[B, S, K, H]` and `[B, T]` operands, for a `jax.shard_map` in which each device attends
    over its own rows and kv heads with the query heads of their groups (a Mosaic kernel is not partitioned
    by the compiler: "Mosaic kernels cannot be automatically partitioned"). Empty specs off a mesh; None
    where the rules split the sequence or head_dim, or the query heads otherwise than the kv heads."""
    active = sharding_rules.active_split()
    if active is None:
        return PartitionSpec(), PartitionSpec(), PartitionSpec()
    mesh, rules = active
    q = sharding_rules.logical_to_spec(("batch", "seq", "q_heads", "head_dim"), rules, mesh=mesh, shape=q_shape)
    kv = sharding_rules.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules, mesh=mesh, shape=kv_shape)
    if q[1] or q[3] or kv[1] or kv[3] or q[0] != kv[0] or not heads_follow(q[2], kv[2], kv_shape[2], mesh):
        return None
    return q, kv, PartitionSpec(q[0], None)


def heads_follow(q_heads, kv_heads, n_kv_heads: int, mesh) -> bool:
    """Whether the devices that split the query heads by `q_heads` (a spec entry: mesh axes) each hold the kv
    heads their query heads use, where `kv_heads` splits the kv heads: the same axes, or the kv heads' axes
    first among the query heads' with one kv head per device (a "kv_rep" mesh: each kv head copied over the
    axes that follow, its query heads split over them; the device's query heads then all use its one)."""
    axes = lambda entry: (entry,) if isinstance(entry, str) else tuple(entry or ())  # noqa: E731
    q, kv = axes(q_heads), axes(kv_heads)
    if q == kv:
        return True
    return q[: len(kv)] == kv and n_kv_heads == math.prod(mesh.shape[a] for a in kv)


def _splash(q_btnh, k_bskh, v_bskh, segment_q_bt, segment_kv_bs, split):
    """splash over the local rows and heads of each device (`splash_split`), under `jax.shard_map` on a mesh."""
    q_spec, kv_spec, seg_spec = split
    active = sharding_rules.active_split()
    if active is None:
        return _splash_local(q_btnh, k_bskh, v_bskh, segment_q_bt, segment_kv_bs)
    segments = () if segment_q_bt is None else (segment_q_bt, segment_kv_bs)
    run = lambda q, k, v, *seg: _splash_local(q, k, v, *(seg or (None, None)))  # noqa: E731
    specs = (q_spec, kv_spec, kv_spec) + (seg_spec,) * len(segments)
    return jax.shard_map(run, mesh=active[0], in_specs=specs, out_specs=q_spec, check_vma=False)(
        q_btnh, k_bskh, v_bskh, *segments
    )


def _splash_local(q_btnh, k_bskh, v_bskh, segment_q_bt, segment_kv_bs):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q_btnh.shape
    s, k = k_bskh.shape[1], k_bskh.shape[2]
    g = n // k
    mask = masks.MultiHeadMask([masks.CausalMask((t, s))] * g)
    # One kv head serves its G query heads; on a CPU (tests) in Pallas interpret mode.
    kernel = kernels.make_splash_mqa_single_device(mask=mask, interpret=target_platform() == "cpu")
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

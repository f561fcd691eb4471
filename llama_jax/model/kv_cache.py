"""The KV cache: a typed pytree of two preallocated buffers, donated to the jitted decode step.

Layout `[L, B, K, S, H]`: layer first so the layer scan indexes it, then one slot per batch row, its
kv heads, and one entry per absolute position (entry s holds position s), so masks are
`s <= query position` and rows of different lengths need no offsets. Kv heads come before positions
because both attention dots read a (b, k) pair's keys and values as one `[S, H]` matrix: that is
the operand a GPU GEMM batches over (B, K) without a transposed copy, and the `(S, H)` tile a TPU
matmul reads. With positions before heads (`[L, B, S, K, H]`) the TPU compiler re-laid out the whole
cache twice per layer per step and the H100 one transposed every layer's K and V per step
(docs/TARGETS.md).

A step writes each row's new entries with one in-place `dynamic_update_slice` per row, its row index
static (`write`): rows sit at different positions, and a scatter of all rows or a loop over a traced
row index made the TPU compiler keep the cache in the layout a row write prefers (`(K, H)` tiles)
and copy it out for the reads. Attention then reads layer i where it lies (`attend`, by `attention.select`):
- a decode step on a GPU: the split-K Triton decode kernel (`paged_attention.contiguous`), each row's
  entries up to its own length: 8K filled in a 128K cache costs what an 8K cache costs;
- every step on a CPU, and where the dense scores would be large: the blockwise loop, key blocks of
  `model.options.attention_block` consecutive positions (a long cache: of a few such pages,
  `blockwise.cached_tiles`) only up to the batch's furthest position (`keys`, `blockwise.cached`);
- otherwise (a TPU's decode step; a GPU's in float32) the dense read: `[B, K, S, H]` as its dots want it
  (`attention.dense_kv_major`), the whole bucket.
No layer is copied per step.

Where the programs run the layers one by one from buffers of their own on a GPU (`decoding.by_layer`),
`k` and `v` are `Unstacked` too, one `[B, K, S, H]` buffer per layer: a GPU copies a layer out of a
stacked cache for some attention dots (layer i's V, split-K, from batch 16 on H100), never out of a
buffer of its own. Same methods, the layer index then a Python int.

`Cache` is what the model and the generation programs (`llama_jax.inference.decoding`) need of a cache: this
contiguous one (`generate`, `stream`) and the engine's `PagedKVCache` over a pool of pages implement
it, so one set of programs serves both. The contiguous cache is kept beside the paged one, not as its
one-page-per-row case, because its attention picks the platform's fused backends (cuDNN, splash)
where the paged cache gathers key blocks through the blockwise loop.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.model import attention, blockwise, paged_attention
from llama_jax.model.config import LlamaConfig
from llama_jax.model.platform import target
from llama_jax.model.unstacked import Unstacked
from llama_jax.sharding import rules

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")  # `KVCache`'s `[L, B, K, S, H]`


class Cache(Protocol):
    """A KV cache as the model uses it: a registered-dataclass pytree with `k` and `v` buffers (their
    sharding pinned to the cache's logical `axes` after a write) that writes a layer's new entries and
    attends over a layer's entries up to each query's position."""

    k: jax.Array
    v: jax.Array
    axes: ClassVar[tuple[str, ...]]  # the logical axes of `k` and `v`, batch second

    def write(self, i: jax.Array | int, k: jax.Array, v: jax.Array, start: jax.Array) -> Cache: ...

    def attend(
        self, i: jax.Array | int, q_btnh: jax.Array, q_index_bt: jax.Array, *, backend: str, block: int
    ) -> jax.Array: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array | Unstacked  # [L, B, K, S, H], or L buffers `[B, K, S, H]`
    v: jax.Array | Unstacked
    axes: ClassVar[tuple[str, ...]] = CACHE_AXES

    @staticmethod
    def shape(config: LlamaConfig, batch: int, length: int) -> tuple[int, ...]:
        """The `[L, B, K, S, H]` shape of each buffer."""
        return (config.n_layers, batch, config.n_kv_heads, length, config.head_dim)

    @classmethod
    def zeros(
        cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.bfloat16, sharding=None, by_layer: bool = False
    ) -> KVCache:
        """A zero cache; with `sharding` (a `NamedSharding` of the whole `[L, B, K, S, H]` buffer) each
        device allocates only its own shard; `by_layer`: one buffer per layer, `Unstacked`."""
        shape = cls.shape(config, batch, length)
        if by_layer:
            shape, sharding = shape[1:], sharding and NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        if by_layer:
            return cls(*(Unstacked(tuple(make() for _ in range(config.n_layers))) for _ in range(2)))
        return cls(make(), make())

    @property
    def length(self) -> int:
        """S: the number of positions the cache holds."""
        return self.k.shape[3]

    def keys(self, i: jax.Array | int, block: int) -> blockwise.Keys:
        """Layer i's key blocks read straight from the `[L, B, K, S, H]` buffers: a decode step reads
        `block` entries per row at a time, never a copy of the layer."""
        _, b, k, s, h = self.k.shape
        block = min(block, s)

        def read(j):
            start = jnp.minimum(j * block, s - block)
            if isinstance(self.k, Unstacked):
                return (
                    start,
                    *(jax.lax.dynamic_slice(x[i], (0, 0, start, 0), (b, k, block, h)) for x in (self.k, self.v)),
                )
            at = (i, 0, 0, start, 0)
            return (start, *(jax.lax.dynamic_slice(x, at, (1, b, k, block, h))[0] for x in (self.k, self.v)))

        return blockwise.Keys(read, s, block, k, kv_major=True)

    def attend(
        self, i: jax.Array | int, q_btnh: jax.Array, q_index_bt: jax.Array, *, backend: str, block: int
    ) -> jax.Array:
        """Attention of queries `[B, T, N, H]` at positions q_index_bt over layer i (`attention.attend`'s
        rule), reading the layer where it lies."""
        b, t, n, h = q_btnh.shape
        fits = paged_attention.contiguous_fits(self.length, h)
        kernel = fits and layer_splits_fit((b, n, h), self.k.shape[1:])  # shapes only: no op traced
        chosen = attention.select(
            backend,
            platform=target(),
            dtype=q_btnh.dtype,
            q_len=t,
            kv_len=self.length,
            batch=b,
            n_heads=n,
            kernel_fits=kernel,
        )
        if chosen == "triton":  # a decode step on a GPU: each row's filled entries, read in place
            return paged_attention.contiguous(q_btnh[:, 0], self.k[i], self.v[i], q_index_bt[:, 0] + 1)[:, None]
        if chosen == "blockwise":  # a long cache in larger tiles (`blockwise.cached_tiles`)
            block_q, block_k = blockwise.cached_tiles(t, self.length, block)
            return blockwise.cached(q_btnh, self.keys(i, block_k), q_index_bt, block_q=block_q)
        k_bksh, v_bksh = self.k[i], self.v[i]
        if chosen == "dense":
            return attention.dense_kv_major(q_btnh, k_bksh, v_bksh, q_index_bt)
        # cuDNN takes `[B, S, K, H]`: a prefill chunk (never a decode step) pays a transposed layer.
        k_bskh, v_bskh = (jnp.swapaxes(x, 1, 2) for x in (k_bksh, v_bksh))
        return attention.attend(q_btnh, k_bskh, v_bskh, q_index_bt, backend=chosen, block=block)

    def write(self, i: jax.Array | int, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
        """Write new entries `[B, T, K, H]` of layer i at positions start[b] ... start[b] + T - 1."""

        def write_rows(buf, new_btkh):
            new_bkth = jnp.swapaxes(new_btkh, 1, 2).astype(buf.dtype)
            if isinstance(buf, Unstacked):  # layer i's own buffer
                layer = _write_layer(buf[i], new_bkth, start)
                return Unstacked(buf.rows[:i] + (layer,) + buf.rows[i + 1 :])
            if not batch_is_split(buf):
                # One in-place update per row, each at a static row index (see the module doc).
                for r in range(new_bkth.shape[0]):
                    buf = jax.lax.dynamic_update_slice(buf, new_bkth[r][None, None], (i, r, 0, start[r], 0))
                return buf
            # Rows split over devices: a row index into the whole buffer would make the partitioner
            # all-gather the cache (gigabytes per prefill for 8B on data=8, measured by the planner), and a
            # scatter over it materialised several copies of it as temporaries. Each device writes its own
            # rows into its own shard, in place (`_write_per_device`); where the rules split the layers,
            # positions or head_dim too, layer i is taken out, written per device, and put back (a copy).
            written = _write_per_device(buf, new_bkth, start, i)
            if written is not None:
                return written
            layer = jax.lax.dynamic_index_in_dim(buf, i, axis=0, keepdims=False)  # [B, K, S, H]
            return jax.lax.dynamic_update_index_in_dim(buf, _write_layer(layer, new_bkth, start), i, axis=0)

        return KVCache(write_rows(self.k, k), write_rows(self.v, v))


def _write_per_device(buf: jax.Array, new_bkth: jax.Array, start: jax.Array, i) -> jax.Array | None:
    """The stacked `[L, B, K, S, H]` buffer with each row's new entries written by the device holding the row,
    in place: under `jax.shard_map`, one `dynamic_update_slice` per local row at a static local index (the
    module doc's write, per device). None where the active rules split the layers, positions or head_dim."""
    mesh, table = rules.active()
    spec = rules.logical_to_spec(CACHE_AXES, table, mesh=mesh, shape=buf.shape)
    if spec[0] or spec[3] or spec[4]:
        return None

    def local(buf, new_bkth, start, i):
        for r in range(new_bkth.shape[0]):
            buf = jax.lax.dynamic_update_slice(buf, new_bkth[r][None, None], (i, r, 0, start[r], 0))
        return buf

    specs = (spec, PartitionSpec(*spec[1:3]), PartitionSpec(spec[1]), PartitionSpec())
    run = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)
    return run(buf, new_bkth, start, jnp.asarray(i, jnp.int32))


def _write_layer(layer: jax.Array, new_bkth: jax.Array, start: jax.Array) -> jax.Array:
    """A layer's own `[B, K, S, H]` buffer with each row's new entries written in place: per row, as the
    stacked write (rows split over devices: per device, under `vmap`)."""
    if batch_is_split(layer[None]):
        return jax.vmap(lambda layer_b, new_b, at: jax.lax.dynamic_update_slice(layer_b, new_b, (0, at, 0)))(
            layer, new_bkth, start
        )
    for r in range(new_bkth.shape[0]):
        layer = jax.lax.dynamic_update_slice(layer, new_bkth[r][None], (r, 0, start[r], 0))
    return layer


def layer_splits_fit(q_bnh_shape, layer_shape) -> bool:
    """Whether the active sharding rules split a `[B, K, S, H]` cache layer by rows and kv heads alone, as the
    GPU decode kernel runs it (`paged_attention.layer_split`); True off a mesh."""
    active = rules.active_split()
    return active is None or paged_attention.layer_split(*active, q_bnh_shape, layer_shape) is not None


def batch_is_split(buf: jax.Array) -> bool:
    """Whether the active sharding rules (`llama_jax.sharding.rules.use_rules`) split the batch axis
    (the second) of a cache buffer."""
    active = rules.active()
    if active is None:
        return False
    mesh, table = active
    return rules.logical_to_spec(CACHE_AXES, table, mesh=mesh, shape=buf.shape)[1] is not None

"""The KV cache: a typed pytree of two preallocated buffers, donated to the jitted decode step.

Layout `[L, B, S, K, H]`: layer first so the layer scan indexes it, then one slot per batch row and
one entry per absolute position (entry s holds position s), so masks are `s <= query position` and
rows of different lengths need no offsets.

Attention reads a row's entries in key blocks of `model.options.attention_block` consecutive positions (a
long cache: of a few such pages, `blockwise.cached_tiles`) straight from the `[L, B, S, K, H]` buffers
(`keys`, `blockwise.cached`), only up to the batch's furthest position, and a step writes one entry
per row in place: no layer is copied per step.

`Cache` is what the model and the generation programs (`llama_jax.decoding`) need of a cache: this
contiguous one (`generate`, `stream`) and the engine's `PagedKVCache` over a pool of pages implement
it, so one set of programs serves both. The contiguous cache is kept beside the paged one, not as its
one-page-per-row case, because its attention picks the platform's fused backends (cuDNN, splash)
where the paged cache gathers key blocks through the blockwise loop.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from llama_jax import attention, blockwise
from llama_jax.config import LlamaConfig
from llama_jax.platform import target
from llama_jax.sharding import rules

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


class Cache(Protocol):
    """A KV cache as the model uses it: a registered-dataclass pytree with `k` and `v` buffers (their
    sharding pinned to `CACHE_AXES` after a write) that writes a layer's new entries and attends over
    a layer's entries up to each query's position."""

    k: jax.Array
    v: jax.Array

    def write(self, i: jax.Array | int, k: jax.Array, v: jax.Array, start: jax.Array) -> Cache: ...

    def attend(
        self, i: jax.Array | int, q_btnh: jax.Array, q_index_bt: jax.Array, *, backend: str, block: int
    ) -> jax.Array: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype=jnp.bfloat16, sharding=None) -> KVCache:
        """A zero cache; with `sharding` (a `NamedSharding`) each device allocates only its own shard."""
        shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
        if sharding is None:
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(make(), make())

    @property
    def length(self) -> int:
        """S: the number of positions the cache holds."""
        return self.k.shape[2]

    def layer(self, i: jax.Array | int) -> tuple[jax.Array, jax.Array]:
        """Layer i's keys and values, `[B, S, K, H]` each (a copy when i is traced)."""
        return self.k[i], self.v[i]

    def keys(self, i: jax.Array | int, block: int) -> blockwise.Keys:
        """Layer i's key blocks read straight from the `[L, B, S, K, H]` buffers: a decode step reads
        `block` entries per row at a time, never a copy of the layer."""
        _, b, s, k, h = self.k.shape
        block = min(block, s)

        def read(j):
            start = jnp.minimum(j * block, s - block)
            at = (i, 0, start, 0, 0)
            return (start, *(jax.lax.dynamic_slice(x, at, (1, b, block, k, h))[0] for x in (self.k, self.v)))

        return blockwise.Keys(read, s, block, k)

    def attend(
        self, i: jax.Array | int, q_btnh: jax.Array, q_index_bt: jax.Array, *, backend: str, block: int
    ) -> jax.Array:
        """Attention of queries `[B, T, N, H]` at positions q_index_bt over layer i (`attention.attend`'s
        rule; the blockwise backend reads the cache in place)."""
        b, t, n, _ = q_btnh.shape
        chosen = attention.select(
            backend, platform=target(), dtype=q_btnh.dtype, q_len=t, kv_len=self.length, batch=b, n_heads=n
        )
        if chosen == "blockwise":  # a long cache in larger tiles (`blockwise.cached_tiles`)
            block_q, block_k = blockwise.cached_tiles(t, self.length, block)
            return blockwise.cached(q_btnh, self.keys(i, block_k), q_index_bt, block_q=block_q)
        k_bskh, v_bskh = self.layer(i)
        return attention.attend(q_btnh, k_bskh, v_bskh, q_index_bt, backend=chosen, block=block)

    def write(self, i: jax.Array | int, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
        """Write new entries `[B, T, K, H]` of layer i at positions start[b] ... start[b] + T - 1."""

        def write_rows(buf, new):
            if new.shape[0] == 1:  # one row: a single in-place update of the donated buffer
                return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), (i, 0, start[0], 0, 0))
            if not batch_is_split(buf):
                # Row after row, each an in-place update of the whole buffer: nothing else is copied.
                def write_row(r, buf):
                    row = jax.lax.dynamic_index_in_dim(new, r, 0, keepdims=True)[None].astype(buf.dtype)
                    return jax.lax.dynamic_update_slice(buf, row, (i, r, start[r], 0, 0))

                return jax.lax.fori_loop(0, new.shape[0], write_row, buf)
            # Rows split over devices: a row index into the whole buffer would make the partitioner
            # all-gather the cache (gigabytes per prefill for 8B on data=8, measured by the planner), and a
            # scatter over it materialised several copies of it as temporaries. Layer i is taken out,
            # each device writes its own rows there, and it is put back.
            layer = jax.lax.dynamic_index_in_dim(buf, i, axis=0, keepdims=False)  # [B, S, K, H]

            def write_layer_row(layer_b, new_b, start_b):  # layer_b [S, K, H], new_b [T, K, H]
                return jax.lax.dynamic_update_slice(layer_b, new_b.astype(layer_b.dtype), (start_b, 0, 0))

            layer = jax.vmap(write_layer_row)(layer, new, start)
            return jax.lax.dynamic_update_index_in_dim(buf, layer, i, axis=0)

        return KVCache(write_rows(self.k, k), write_rows(self.v, v))


def batch_is_split(buf: jax.Array) -> bool:
    """Whether the active sharding rules (`llama_jax.sharding.rules.use_rules`) split the cache's batch axis."""
    active = rules.active()
    if active is None:
        return False
    mesh, table = active
    return rules.logical_to_spec(CACHE_AXES, table, mesh=mesh, shape=buf.shape)[1] is not None

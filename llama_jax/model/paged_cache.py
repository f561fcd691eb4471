"""The paged KV cache of the continuous-batching engine: fixed-size pages, a page table per slot.

Device side, `PagedKVCache`: keys and values live in one pool of pages `[L, P, page, K, H]` shared by
every slot; `page_table [B, M]` maps slot b's j-th block of `page` positions to a page of the pool, so
position p of slot b is entry `p % page` of page `page_table[b, p // page]`. Memory is proportional to
the tokens held, not to B x the longest request. It has `KVCache`'s interface (`write`, `attend`), so
the model runs on it unchanged: `Llama.forward(..., cache=paged)`.

Page 0 is the null page: never handed out, it stands in every unused page-table entry. Writes a slot
makes beyond its pages (an idle slot, a prefill chunk's padding) land there; reads of it are masked
(a key is visible only at positions <= the query's), so its contents never matter.

Attention over the pages (`kernel`, chosen by `attention.select_paged`):
- "blockwise" (CPU, sharded pools, and every prefill chunk): `blockwise.cached`, the blockwise online
  softmax (FlashAttention's recurrence) with key blocks = `block_pages` consecutive page-table entries,
  gathered from the pool one block at a time: a step reads the blocks up to the slot batch's furthest
  position, never a whole row. Each gathered block is written out and read back.
- "mosaic" (TPU) / "triton" (GPU), decode steps: a Pallas paged-attention kernel (`paged_attention`) that
  reads each row's own filled pages from the pool in place. Those kernels want the pool kv-heads first,
  so their pool is `[K, L, P, page, H]` (`pool_shape`); the blockwise loop reads either layout.

Host side, `PagePool`: the free list, reference counts, and the prefix cache (page-aligned prompt
blocks hashed by their whole prefix, so a block is shared only by requests that agree on every token
before it). Pages a finished request registered stay cached at refcount 0 until the free list runs dry,
then the least recently released is reclaimed.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import blockwise, paged_attention
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import batch_is_split

NULL_PAGE = 0
POOL_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")  # the pool's `[L, P, page, K, H]`


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k: jax.Array  # [L, P, page, K, H]: the page pool ([K, L, P, page, H] for a kernel: `pool_shape`)
    v: jax.Array
    page_table: jax.Array  # [B, M] int32: slot b's pages, in position order (NULL_PAGE where none)
    block_pages: int = dataclasses.field(default=4, metadata=dict(static=True))  # pages per attention key block
    kernel: str = dataclasses.field(default="blockwise", metadata=dict(static=True))  # `attention.select_paged`

    @property
    def axes(self) -> tuple[str, ...]:
        """The pool's logical axes, which the model pins it to after a write (`pool_axes`)."""
        return pool_axes(self.kernel)

    @classmethod
    def zeros(
        cls, config: LlamaConfig, n_pages: int, page: int, dtype=jnp.bfloat16, spec=None, kernel: str = "blockwise"
    ) -> tuple[jax.Array, jax.Array]:
        """A zero page pool (k, v) laid out for `kernel`, page 0 being the null page. With `spec` (the model's
        `ShardingSpec`) it is created in place where the model's layers pin it (`pool_axes`: pages on the
        batch axes, KV heads on "tensor")."""
        shape = pool_shape(config, n_pages, page, kernel)
        sharding = None if spec is None else spec.sharding(pool_axes(kernel), shape)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return make(), make()

    @property
    def heads_first(self) -> bool:
        """The pool is `[K, L, P, page, H]` (a kernel's), not `[L, P, page, K, H]`."""
        return self.kernel != "blockwise"

    @property
    def page(self) -> int:
        return self.k.shape[3 if self.heads_first else 2]

    def write(self, i: jax.Array | int, k_btkh: jax.Array, v_btkh: jax.Array, start_b: jax.Array) -> PagedKVCache:
        """Write new entries `[B, T, K, H]` of layer i at positions start[b] ... start[b] + T - 1."""
        b, t = k_btkh.shape[:2]
        positions_bt = start_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        block_bt = positions_bt // self.page
        inside = block_bt < self.page_table.shape[1]  # past the table: the null page
        pages_bt = jnp.take_along_axis(self.page_table, jnp.where(inside, block_bt, 0), axis=1)
        pages_bt = jnp.where(inside, pages_bt, NULL_PAGE)
        offsets_bt = positions_bt % self.page

        def write_layer(buf, new_btkh):
            if self.heads_first:  # one scatter into [K, L, P, page, H] of rows of H, in place
                # The kv head is an index, not a window: with (K, H) windows the TPU compiler lays the
                # pool out K-minor for the scatter and copies it back for the kernel, every layer and step.
                heads_k11 = jnp.arange(buf.shape[0])[:, None, None]
                at = buf.at[heads_k11, i, pages_bt[None], offsets_bt[None]]
                return at.set(new_btkh.transpose(2, 0, 1, 3).astype(buf.dtype))
            if not batch_is_split(buf):  # one scatter into the whole pool, in place
                return buf.at[i, pages_bt, offsets_bt].set(new_btkh.astype(buf.dtype))
            # Pages split over devices: as `KVCache.write`, the layer goes out and back (see there).
            layer = jax.lax.dynamic_index_in_dim(buf, i, axis=0, keepdims=False)  # [P, page, K, H]
            layer = layer.at[pages_bt, offsets_bt].set(new_btkh.astype(buf.dtype))
            return jax.lax.dynamic_update_index_in_dim(buf, layer, i, axis=0)

        return dataclasses.replace(self, k=write_layer(self.k, k_btkh), v=write_layer(self.v, v_btkh))

    def keys(self, i: jax.Array | int) -> blockwise.Keys:
        """Layer i's key blocks: `block_pages` consecutive page-table entries per block, each row's pages
        gathered from the pool one block at a time."""
        page, k, h = self.page, self.k.shape[0 if self.heads_first else 3], self.k.shape[-1]
        b, m = self.page_table.shape
        block = page * self.block_pages

        def gather(x, pages_bj):
            if self.heads_first:  # [K, B, pages, page, H] → [B, block, K, H]: a block, not the pool
                return jnp.moveaxis(x[:, i, pages_bj], 0, -2).reshape(b, block, k, h)
            # Gathered straight from the [L, P, page, K, H] pool: no copy of the layer's pool.
            return x[i, pages_bj].reshape(b, block, k, h)

        def read(j):
            pages_bj = jax.lax.dynamic_slice_in_dim(self.page_table, j * self.block_pages, self.block_pages, axis=1)
            return (j * block, gather(self.k, pages_bj), gather(self.v, pages_bj))

        return blockwise.Keys(read, m * page, block, k)

    def attend(self, i, q_btnh: jax.Array, q_index_bt: jax.Array, **_) -> jax.Array:
        """Attention of queries `[B, T, N, H]` at positions q_index_bt over slot b's pages of layer i. A decode
        step (T = 1) on a kernel's pool runs the kernel over each row's first q_index + 1 entries; otherwise
        the blockwise loop (`blockwise.cached`), its key blocks gathered from the pages. The model's
        `backend` is not read here: the engine chose `kernel` for its pool (`attention.select_paged`)."""
        if self.heads_first and q_btnh.shape[1] == 1:
            n_kv, n_layers, n_pages = self.k.shape[:3]
            pool = [x.reshape(n_kv, n_layers * n_pages, *x.shape[3:]) for x in (self.k, self.v)]  # free
            table = self.page_table + i * n_pages  # layer i's pages in the [K, L·P, page, H] view
            out_bnh = paged_attention.decode(
                q_btnh[:, 0], *pool, q_index_bt[:, 0] + 1, table, kernel=self.kernel, pages_per_block=self.block_pages
            )
            return out_bnh[:, None]
        return blockwise.cached(q_btnh, self.keys(i), q_index_bt)


def pool_shape(config: LlamaConfig, n_pages: int, page: int, kernel: str = "blockwise") -> tuple[int, ...]:
    """The page pool's shape for `kernel`: `[L, P, page, K, H]` for the blockwise loop, kv-heads first
    `[K, L, P, page, H]` for the Pallas kernels (`paged_attention`)."""
    shape = (config.n_layers, n_pages, page, config.n_kv_heads, config.head_dim)
    return shape if kernel == "blockwise" else (config.n_kv_heads, *shape[:3], config.head_dim)


def pool_axes(kernel: str = "blockwise") -> tuple[str, ...]:
    """The logical axes of `pool_shape(..., kernel)`: pages on the batch axes, KV heads on "tensor"."""
    return POOL_AXES if kernel == "blockwise" else (POOL_AXES[3], *POOL_AXES[:3], POOL_AXES[4])


# ---- host side: the free list, reference counts, the prefix cache ------------------------------------


def block_hashes(tokens, page: int, n_blocks: int) -> list[bytes]:
    """The hash of each of the first n_blocks full pages of `tokens`, each covering every token up to
    the end of its page (so equal hashes mean equal prefixes, not just equal blocks)."""
    hashes, h = [], hashlib.sha256()
    ids = np.asarray(tokens, np.int32)
    for j in range(n_blocks):
        h.update(ids[j * page : (j + 1) * page].tobytes())
        hashes.append(h.copy().digest())
    return hashes


class PagePool:
    """Pages 1 .. n_pages - 1 of the pool: free, held (refcount > 0), or cached (a prompt block kept at
    refcount 0 for a later request with the same prefix, reclaimed least recently released first)."""

    def __init__(self, n_pages: int, prefix_cache: bool = True) -> None:
        if n_pages < 2:
            raise ValueError(f"n_pages: expected at least 2 (page 0 is the null page), got {n_pages}")
        self.n_pages = n_pages
        self.prefix_cache = prefix_cache
        self.free = collections.deque(range(1, n_pages))
        self.refs = np.zeros(n_pages, np.int32)
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # refcount-0 cached pages

    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (refcount 1), or None (nothing taken) when fewer than n can be had."""
        if n > self.available():
            return None
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:  # reclaim the least recently released cached prompt block
                page, _ = self.cached.popitem(last=False)
                del self.by_hash[self.hash_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `hashes`, each referenced once more."""
        pages = []
        if not self.prefix_cache:
            return pages
        for h in hashes:
            page = self.by_hash.get(h)
            if page is None:
                break
            self.cached.pop(page, None)
            self.refs[page] += 1
            pages.append(page)
        return pages

    def register(self, page: int, h: bytes) -> None:
        """Offer a page that now holds a full prompt block to later requests with the same prefix."""
        if self.prefix_cache and h not in self.by_hash and page not in self.hash_of:
            self.by_hash[h] = page
            self.hash_of[page] = h

    def forget(self, page: int) -> None:
        """Withdraw a page from the prefix cache (its block was never written: its owner was preempted)."""
        h = self.hash_of.pop(page, None)
        if h is not None:
            del self.by_hash[h]

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            assert self.refs[page] >= 0, f"page {page} released more often than it was taken"
            if self.refs[page] == 0:
                if page in self.hash_of:
                    self.cached[page] = None
                else:
                    self.free.append(page)

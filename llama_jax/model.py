"""The Llama 3.x decoder, whole, in one file: RMSNorm → attention (GQA, RoPE) → SwiGLU → block → stack.

Reads beside Meta's `llama_models/llama3/model.py`: same module and weight names (`wq`, `wk`, `wv`,
`wo`, `w1`, `w2`, `w3`, `attention_norm`, `ffn_norm`, `tok_embeddings`, `output`), same numerics
(norms, RoPE and softmax in float32, logits returned in float32).

Weights are stored input-dimension first so every projection is one readable einsum; each parameter
carries logical axis names (see `sharding/rules.py`), never mesh axes. Layers are stacked along a
leading "layers" axis and run under `lax.scan`, so compile time does not grow with depth.

Dimension letters: B batch, T query positions, S key positions, D model, F ffn, N query heads,
K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import quant, rope
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import CACHE_AXES, KVCache
from sharding.rules import ShardingSpec, constrain, use_rules

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _param(rngs: nnx.Rngs, init: Initializer, shape, dtype, names: tuple[str, ...]) -> nnx.Param:
    # eager_sharding=False: the weights are placed by the loader / `sharding`, not at construction.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


_normal = nnx.initializers.normal(stddev=0.02)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32, cast back, then scale in the activation dtype (Meta and HF alike).
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
        return y.astype(x.dtype) * weight


class Attention(nnx.Module):
    """Grouped-query attention: N query heads share K kv heads (query head n uses kv head n // G)."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = _param(rngs, _normal, (d, n, h), dtype, ("embed", "q_heads", "head_dim"))
        self.wk = _param(rngs, _normal, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, _normal, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, _normal, (n, h, d), dtype, ("q_heads", "head_dim", "embed"))

    def __call__(self, x_btd, sin, cos, positions_bt, cache: KVCache | None, layer, *, use_cache: bool,
                 implementation: str | None):  # fmt: skip
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...])
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.wk[...])
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.wv[...])
        q_btnh = constrain(rope.apply_rope(q_btnh, sin, cos), ("batch", "seq", "q_heads", "head_dim"))
        k_btkh = constrain(rope.apply_rope(k_btkh, sin, cos), ("batch", "seq", "kv_heads", "head_dim"))

        if cache is not None:
            cache = cache.write(layer, k_btkh, v_btkh, positions_bt[:, 0])
            # Pin the written cache to its own sharding. Left to propagation, a cache whose head axis
            # is replicated (fewer KV heads than the tensor axis) is re-split by the GQA attention
            # and all-gathered back: the whole cache, every decode step.
            cache = dataclasses.replace(cache, k=constrain(cache.k, CACHE_AXES), v=constrain(cache.v, CACHE_AXES))
        if use_cache:
            # Attend over the cache: entry s holds position s, valid when s <= the query's position.
            k_bskh, v_bskh = cache.layer(layer)
            mask = jnp.arange(cache.length)[None, None, :] <= positions_bt[:, :, None]
            out_btnh = jax.nn.dot_product_attention(
                q_btnh, k_bskh, v_bskh, mask=mask[:, None], implementation=implementation
            )
        else:
            # Attend within the chunk (full forward, or prefill of an empty cache): plain causal.
            out_btnh = jax.nn.dot_product_attention(
                q_btnh, k_btkh, v_btkh, is_causal=True, implementation=implementation
            )
        return jnp.einsum("btnh,nhd->btd", out_btnh, self.wo[...]), cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(x w1) * (x w3)).

    With `fp8` set, w1/w3/w2 are float8_e4m3fn with a float32 scale per output channel
    (`w1_scale` [F], `w3_scale` [F], `w2_scale` [D]) and the matmuls run from FP8 (`quant.fp8_linear`).
    """

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, fp8: quant.Fp8Spec | None = None):
        d, f = config.dim, config.ffn_dim
        self.fp8 = fp8
        init, wdtype = (_zeros, quant.FP8) if fp8 is not None else (_normal, dtype)
        self.w1 = _param(rngs, init, (d, f), wdtype, ("embed", "mlp"))
        self.w3 = _param(rngs, init, (d, f), wdtype, ("embed", "mlp"))
        self.w2 = _param(rngs, init, (f, d), wdtype, ("mlp", "embed"))
        if fp8 is not None:
            self.w1_scale = _param(rngs, nnx.initializers.ones, (f,), jnp.float32, ("mlp",))
            self.w3_scale = _param(rngs, nnx.initializers.ones, (f,), jnp.float32, ("mlp",))
            self.w2_scale = _param(rngs, nnx.initializers.ones, (d,), jnp.float32, ("embed",))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        if self.fp8 is not None:
            linear = functools.partial(quant.fp8_linear, mode=self.fp8.matmul, scale_ub=self.fp8.activation_scale_ub)
            gate_btf = jax.nn.silu(linear(x_btd, self.w1[...], self.w1_scale[...]))
            h_btf = constrain(gate_btf * linear(x_btd, self.w3[...], self.w3_scale[...]), ("batch", "seq", "mlp"))
            return linear(h_btf, self.w2[...], self.w2_scale[...])
        gate_btf = jax.nn.silu(jnp.einsum("btd,df->btf", x_btd, self.w1[...]))
        up_btf = jnp.einsum("btd,df->btf", x_btd, self.w3[...])
        h_btf = constrain(gate_btf * up_btf, ("batch", "seq", "mlp"))
        return jnp.einsum("btf,fd->btd", h_btf, self.w2[...])


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, fp8: quant.Fp8Spec | None = None):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.attention = Attention(config, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(config, dtype=dtype, rngs=rngs, fp8=fp8)

    def __call__(self, x_btd, sin, cos, positions_bt, cache, layer, *, use_cache, implementation, ffn=None):
        with jax.named_scope("attention"):
            attn, cache = self.attention(
                self.attention_norm(x_btd), sin, cos, positions_bt, cache, layer,
                use_cache=use_cache, implementation=implementation,
            )  # fmt: skip
        h_btd = constrain(x_btd + attn, ("batch", "seq", "embed"))
        with jax.named_scope("feed_forward"):
            out_btd = h_btd + (ffn or self.feed_forward)(self.ffn_norm(h_btd))
        return constrain(out_btd, ("batch", "seq", "embed")), cache


class Llama(nnx.Module):
    """The decoder. `model(tokens, positions=None)` → float32 logits `[B, T, V]`.

    Args:
      config: the architecture.
      dtype: parameter and activation dtype (bfloat16 by default; float32 for parity work).
      rngs: initialisation randomness (random weights; `llama_jax.load` fills real ones).
      attention_impl: passed to `jax.nn.dot_product_attention` ("cudnn" on H100, "xla", None=auto).
      fp8: FFN weights of `fp8.quantized_layers` in rowwise FP8 (the FP8 405B release); the other
        layers' FFNs live unquantized in `dense_ffn`, stacked over those layers only.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
        attention_impl: str | None = None,
        fp8: quant.Fp8Spec | None = None,
    ):
        self.config = config
        self.fp8 = fp8
        self.dtype = jnp.dtype(dtype)
        self.attention_impl = attention_impl
        # Set by `load(..., mesh=...)`: activations are then pinned by the same logical rules.
        self.sharding: ShardingSpec | None = None
        self.tok_embeddings = _param(rngs, _normal, (config.vocab_size, config.dim), dtype, ("vocab", "embed"))
        self.layers = _stacked_blocks(config, dtype, rngs, fp8)
        dense = fp8.dense_layers(config.n_layers) if fp8 is not None else ()
        self.dense_ffn = (
            _stacked(lambda r: FeedForward(config, dtype=dtype, rngs=r), len(dense), rngs) if dense else None
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.output = (
            None
            if config.tie_embeddings
            else _param(rngs, _normal, (config.dim, config.vocab_size), dtype, ("embed", "vocab"))
        )

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens `[B, T]` int, positions `[B, T]` (default 0..T-1) → logits `[B, T, V]` float32."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, _ = self.forward(tokens, positions)
        return logits

    def prefill(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run prompts `[B, T]` (positions 0..T-1) into an empty cache; → (logits `[B, T, V]`, cache)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return self.forward(tokens, positions, cache)

    def decode(
        self, tokens: jax.Array, positions: jax.Array, cache: KVCache, *, unroll: int | bool = 1
    ) -> tuple[jax.Array, KVCache]:
        """Feed `[B, T]` new tokens at `positions` `[B, T]`, attending over the cache."""
        return self.forward(tokens, positions, cache, use_cache=True, unroll=unroll)

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        *,
        use_cache: bool = False,
        unroll: int | bool = 1,
    ) -> tuple[jax.Array, KVCache | None]:
        """The one forward pass behind `__call__`, `prefill` and `decode`.

        `unroll` is handed to the layer scan: 1 keeps compile time flat in depth; full unrolling
        lets XLA read each layer's weights in place, which is faster for the decode step on CPU.
        """
        with use_rules(self.sharding.mesh, self.sharding.rules) if self.sharding else contextlib.nullcontext():
            return self._forward(tokens, positions, cache, use_cache=use_cache, unroll=unroll)

    def _forward(self, tokens, positions, cache, *, use_cache, unroll):
        config = self.config
        x_btd = constrain(self.tok_embeddings[...][tokens].astype(self.dtype), ("batch", "seq", "embed"))
        inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        sin, cos = rope.sin_cos(positions, inv_freq)
        graphdef, layer_params = nnx.split(self.layers)
        if self.dense_ffn is not None:
            dense_graphdef, dense_params = nnx.split(self.dense_ffn)
            dense_slots = jnp.asarray(self.fp8.dense_slots(config.n_layers), jnp.int32)

        def one_layer(carry, params):
            x_btd, cache, layer = carry
            block = nnx.merge(graphdef, params)
            ffn = None
            if self.dense_ffn is not None:
                # FP8 model: the layers the release left unquantized run their FFN from `dense_ffn`.
                slot = dense_slots[layer]

                def dense(x):
                    one = jax.tree.map(lambda a: a[jnp.maximum(slot, 0)], dense_params)
                    return nnx.merge(dense_graphdef, one)(x)

                def ffn(x):
                    return jax.lax.cond(slot >= 0, dense, block.feed_forward, x)

            with jax.named_scope("block"):
                x_btd, cache = block(
                    x_btd, sin, cos, positions, cache, layer,
                    use_cache=use_cache, implementation=self.attention_impl, ffn=ffn,
                )  # fmt: skip
            return (x_btd, cache, layer + 1), None

        (x_btd, cache, _), _ = jax.lax.scan(
            one_layer, (x_btd, cache, jnp.int32(0)), layer_params, length=config.n_layers, unroll=unroll
        )
        h_btd = self.norm(x_btd)
        head_dv = self.tok_embeddings[...].T if self.output is None else self.output[...]
        logits = jnp.einsum("btd,dv->btv", h_btd, head_dv.astype(self.dtype), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab")), cache


def _stacked_blocks(config: LlamaConfig, dtype, rngs: nnx.Rngs, fp8: quant.Fp8Spec | None = None) -> Block:
    """L blocks whose parameters are stacked along a leading "layers" axis."""
    return _stacked(lambda r: Block(config, dtype=dtype, rngs=r, fp8=fp8), config.n_layers, rngs)


def _stacked(make_one: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n modules whose parameters are stacked along a leading "layers" axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_one(rngs)

    return make(rngs)

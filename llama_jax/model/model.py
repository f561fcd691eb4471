"""The Llama 3.x decoder, whole, in one file: RMSNorm → attention (GQA, RoPE) → SwiGLU → block → stack.

Reads beside Meta's `llama_models/llama3/model.py`: same module and weight names (`wq`, `wk`, `wv`,
`wo`, `w1`, `w2`, `w3`, `attention_norm`, `ffn_norm`, `tok_embeddings`, `output`), same numerics
(norms, RoPE and softmax in float32, logits returned in float32).

Weights are stored input-dimension first so every projection is one readable einsum; each parameter
carries logical axis names (`llama_jax/sharding/rules.py`), never mesh axes. What a block computes reads
the parameters as values (`Block.weights()` → `BlockWeights`), each projection a `linear` weight that
multiplies as it is stored (FP8 with its scale, LoRA-adapted, fused), so the math never asks which.
Layers are stacked along a leading "layers" axis and run under `lax.scan` (compile time flat in depth),
or one by one from buffers of their own: the decode step's copy (`decoding.layer_weights`), or the
model's own layers held `unstacked` (a GPU too small for that copy). One loop: `Llama._layers`.

Everything a model is built with besides its architecture is one frozen `options.Options`, fixed at
construction; `abstract` builds a shape-only model, `with_options` a model sharing the weights.

Dimension letters: B batch, T query positions, S key positions, D model, F ffn, N query heads,
K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.model import attention as attention_lib
from llama_jax.model import quant, rope, unstacked
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.linear import LORA_TARGETS, Fused, LoraSpec, Separate, Weight, adapter_params, weight
from llama_jax.model.options import Options
from llama_jax.model.unstacked import Unstacked
from llama_jax.sharding import rules
from llama_jax.sharding.rules import constrain, use_rules

__all__ = ["LORA_TARGETS", "BlockWeights", "Llama", "LoraSpec", "abstract"]


def _param(rngs: nnx.Rngs, init, shape, dtype, names: tuple[str, ...]) -> nnx.Param:
    # eager_sharding=False: the weights are placed by the loader / `sharding`, not at construction.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


_normal = nnx.initializers.normal(stddev=0.02)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # Normalise in float32, cast back, then scale in the activation dtype (Meta and HF alike).
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype).reshape((1,) * (x.ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (dim,), dtype, ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query attention's weights: N query heads share K kv heads (query head n uses kv head n // G)."""

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, lora: LoraSpec | None):
        d, n, k, h = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = _param(rngs, _normal, (d, n, h), dtype, ("embed", "q_heads", "head_dim"))
        self.wk = _param(rngs, _normal, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, _normal, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, _normal, (n, h, d), dtype, ("q_heads", "head_dim", "embed"))
        self.wq_lora = adapter_params(lora, "wq", self.wq, 1, rngs)
        self.wk_lora = adapter_params(lora, "wk", self.wk, 1, rngs)
        self.wv_lora = adapter_params(lora, "wv", self.wv, 1, rngs)
        self.wo_lora = adapter_params(lora, "wo", self.wo, 2, rngs)

    def weights(self) -> AttentionWeights:
        return AttentionWeights(
            Separate((weight(self, "wq"), weight(self, "wk"), weight(self, "wv"))), weight(self, "wo")
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionWeights:
    wqkv: Separate | Fused  # wq, wk, wv: [D, N or K, H] each
    wo: Weight  # [N, H, D]

    def __call__(self, x_btd, sin, cos, positions_bt, cache, layer, *, options: Options, use_cache, segment_ids_bt):
        q_btnh, k_btkh, v_btkh = self.wqkv("btd,dch->btch", x_btd)
        q_btnh = constrain(rope.apply_rope(q_btnh, sin, cos), ("batch", "seq", "q_heads", "head_dim"))
        k_btkh = constrain(rope.apply_rope(k_btkh, sin, cos), ("batch", "seq", "kv_heads", "head_dim"))
        backend, block = options.attention_backend, options.attention_block
        if cache is not None:
            cache = cache.write(layer, k_btkh, v_btkh, positions_bt[:, 0])
            # Pin the written cache to its own sharding. Left to propagation, a cache whose head axis is
            # replicated (fewer KV heads than tensor devices) is re-split and all-gathered back per step.
            k, v = (unstacked.constrain(x, cache.axes) for x in (cache.k, cache.v))
            cache = dataclasses.replace(cache, k=k, v=v)
        if use_cache:
            # Attend over the cache: position s is visible when s <= the query's position. The cache
            # reads its own layout (contiguous `KVCache`, or the engine's `PagedKVCache` of pages),
            # only up to the batch's furthest position.
            out_btnh = cache.attend(layer, q_btnh, positions_bt, backend=backend, block=block)
        else:
            # Attend within the chunk (full forward, or prefill of an empty cache): causal by index, and
            # with packed sequences (training) only within each token's own document.
            index_bt = jnp.broadcast_to(jnp.arange(x_btd.shape[1]), x_btd.shape[:2])
            segments = {"segment_q_bt": segment_ids_bt, "segment_kv_bs": segment_ids_bt}
            out_btnh = attention_lib.attend(
                q_btnh, k_btkh, v_btkh, index_bt, **segments, backend=backend, block=block, q_offset=False
            )
        return self.wo("btnh,nhd->btd", out_btnh), cache


class FeedForward(nnx.Module):
    """SwiGLU's weights: w2(silu(x w1) * (x w3)).

    With `fp8` set, w1/w3/w2 are float8_e4m3fn in the FP8 GEMM's layout, output channel first (w1, w3
    [F, D], w2 [D, F]: `quant`), with a float32 scale per output channel (`w1_scale` [F], `w3_scale`
    [F], `w2_scale` [D]), and the matmuls run from FP8 (`quant.fp8_linear`).
    """

    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, fp8=None, lora: LoraSpec | None = None):
        d, f = config.dim, config.ffn_dim
        self.fp8 = fp8
        if fp8 is None:
            self.w1 = _param(rngs, _normal, (d, f), dtype, ("embed", "mlp"))
            self.w3 = _param(rngs, _normal, (d, f), dtype, ("embed", "mlp"))
            self.w2 = _param(rngs, _normal, (f, d), dtype, ("mlp", "embed"))
        else:
            self.w1 = _param(rngs, nnx.initializers.zeros, (f, d), quant.FP8, ("mlp", "embed"))
            self.w3 = _param(rngs, nnx.initializers.zeros, (f, d), quant.FP8, ("mlp", "embed"))
            self.w2 = _param(rngs, nnx.initializers.zeros, (d, f), quant.FP8, ("embed", "mlp"))
            self.w1_scale = _param(rngs, nnx.initializers.ones, (f,), jnp.float32, ("mlp",))
            self.w3_scale = _param(rngs, nnx.initializers.ones, (f,), jnp.float32, ("mlp",))
            self.w2_scale = _param(rngs, nnx.initializers.ones, (d,), jnp.float32, ("embed",))
        self.w1_lora = adapter_params(lora, "w1", self.w1, 1, rngs)
        self.w3_lora = adapter_params(lora, "w3", self.w3, 1, rngs)
        self.w2_lora = adapter_params(lora, "w2", self.w2, 1, rngs)

    def weights(self) -> FeedForwardWeights:
        return FeedForwardWeights(
            Separate((weight(self, "w1", self.fp8), weight(self, "w3", self.fp8))), weight(self, "w2", self.fp8)
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FeedForwardWeights:
    w13: Separate | Fused  # w1 (gate), w3 (up): [D, F] each (FP8: [F, D])
    w2: Weight  # [F, D] (FP8: [D, F])

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btf, up_btf = self.w13("btd,df->btf", x_btd)
        h_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "seq", "mlp"))
        return self.w2("btf,fd->btd", h_btf)


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, options: Options):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.attention = Attention(config, dtype=dtype, rngs=rngs, lora=options.lora)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(config, dtype=dtype, rngs=rngs, fp8=options.fp8, lora=options.lora)

    def weights(self) -> BlockWeights:
        return BlockWeights(
            self.attention_norm.weight[...],
            self.attention.weights(),
            self.ffn_norm.weight[...],
            self.feed_forward.weights(),
            self.attention_norm.eps,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockWeights:
    """What one block multiplies by: a layer of the stack (`Block.weights()`), or of the decode step's own copy."""

    attention_norm: jax.Array
    attention: AttentionWeights
    ffn_norm: jax.Array
    feed_forward: FeedForwardWeights
    eps: float = dataclasses.field(metadata={"static": True})

    def fused(self) -> BlockWeights:
        """wq|wk|wv as one `[D, N + 2K, H]` weight and w1|w3 as one `[D, 2F]` (FP8: `[2F, D]` with their scales):
        4 projection dots per layer instead of 7."""
        attention = dataclasses.replace(self.attention, wqkv=self.attention.wqkv.fused())
        feed_forward = dataclasses.replace(self.feed_forward, w13=self.feed_forward.w13.fused())
        return dataclasses.replace(self, attention=attention, feed_forward=feed_forward)

    def __call__(self, x_btd, sin, cos, positions_bt, cache, layer, *, ffn=None, **attention):
        """One block; `ffn`, when given, replaces this block's feed-forward (an FP8 model's dense layers)."""
        with jax.named_scope("attention"):
            attn, cache = self.attention(
                rms_norm(x_btd, self.attention_norm, self.eps), sin, cos, positions_bt, cache, layer, **attention
            )
        h_btd = constrain(x_btd + attn, ("batch", "seq", "embed"))
        with jax.named_scope("feed_forward"):
            out_btd = h_btd + (ffn or self.feed_forward)(rms_norm(h_btd, self.ffn_norm, self.eps))
        return constrain(out_btd, ("batch", "seq", "embed")), cache


class Llama(nnx.Module):
    """The decoder. `model(tokens, positions=None)` → float32 logits `[B, T, V]`.

    Args:
      config: the architecture.
      dtype: parameter and activation dtype (bfloat16 by default; float32 for parity work).
      rngs: initialisation randomness (random weights; `llama_jax.load` fills real ones).
      options: everything else it is built with (`Options`), fixed for its life: another setting is
        another model (`with_options`, which shares the weights).
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs, options: Options = Options()):
        self.config = config
        self.options = options
        self.dtype = jnp.dtype(dtype)
        self.tok_embeddings = _param(rngs, _normal, (config.vocab_size, config.dim), dtype, ("vocab", "embed"))
        self.layers = _stacked(lambda r: Block(config, dtype=dtype, rngs=r, options=options), config.n_layers, rngs)
        dense = len(options.fp8.dense_layers(config.n_layers)) if options.fp8 is not None else 0
        self.dense_ffn = _stacked(lambda r: FeedForward(config, dtype=dtype, rngs=r), dense, rngs) if dense else None
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        labels, d, v = options.score_labels, config.dim, config.vocab_size
        untied = not (config.tie_embeddings or labels)
        self.output = _param(rngs, _normal, (d, v), dtype, ("embed", "vocab")) if untied else None
        # Few labels: replicated (None), a [D, 1] head is not worth splitting.
        self.score = _param(rngs, _normal, (config.dim, labels), dtype, ("embed", None)) if labels else None

    # Read-only views of `options` that callers ask for by name.
    fp8 = property(lambda self: self.options.fp8)
    lora = property(lambda self: self.options.lora)
    sharding = property(lambda self: self.options.sharding)

    def with_options(self, **changes) -> Llama:
        """A model with `options` changed (`dataclasses.replace`), sharing this one's weights (no copy).
        Parameters the new options add or drop (adapters) are `lora.add_adapters`' and `lora.merge`'s."""
        options = dataclasses.replace(self.options, **changes)
        graphdef = nnx.graphdef(abstract(self.config, self.dtype, options))
        return nnx.merge(graphdef, jax.tree.map(lambda x: x, nnx.state(self)))

    def output_weight(self) -> jax.Array:
        """The output projection `[D, V]` (`[D, labels]` with a score head), in the activation dtype."""
        if self.score is not None:
            return self.score[...].astype(self.dtype)
        return (self.tok_embeddings[...].T if self.output is None else self.output[...]).astype(self.dtype)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
    ) -> jax.Array:
        """tokens `[B, T]` int, positions `[B, T]` (default 0..T-1) → logits `[B, T, V]` float32.

        segment_ids `[B, T]`: documents packed in one row (training); a token attends only to earlier
        tokens of its own segment.
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, _ = self.forward(tokens, positions, segment_ids=segment_ids)
        return logits

    def prefill(self, tokens, cache: KVCache, lengths=None, *, chunk=None, hidden=False, layers=None):
        """Run prompts `[B, T]` (positions 0..T-1, right-padded) into an empty cache.

        → (float32 logits `[B, V]` of each row's last prompt token, at `lengths - 1` (default T - 1), cache),
        and with `hidden` the final-normed hidden states `[B, T, D]` (for `head`; zeros past every prompt's
        chunks). Only those B rows go through the vocabulary projection, never all `[B, T, V]`. A prompt longer
        than `chunk` (default `options.prefill_chunk`) runs as a loop over chunks of that many tokens, each
        attending over the cache the chunks before it filled: activations stay `[B, chunk, ...]` at any T.
        `layers`: as `forward`'s."""
        b, t = tokens.shape
        last_b = jnp.full((b,), t - 1, jnp.int32) if lengths is None else lengths - 1
        c = min(chunk or self.options.prefill_chunk, t)

        def run(tokens_bc, positions_bc, cache, at_b, **kw):
            h_bcd, cache = self.forward(tokens_bc, positions_bc, cache, logits=False, layers=layers, **kw)
            return self.head(jnp.take_along_axis(h_bcd, at_b[:, None, None], axis=1))[:, 0], h_bcd, cache

        if t == c:  # one chunk: causal within it (the fused kernels' own causal mask applies)
            logits_bv, h_btd, cache = run(tokens, jnp.broadcast_to(jnp.arange(t), tokens.shape), cache, last_b)
            return (logits_bv, cache, h_btd) if hidden else (logits_bv, cache)
        if t % c:
            raise ValueError(f"prefill: the prompt length {t} must be a multiple of the chunk ({c})")

        def run_chunk(i, carry):
            cache, logits_bv, h_nbcd = carry
            start = i * c
            tokens_bc = jax.lax.dynamic_slice_in_dim(tokens, start, c, axis=1)
            positions_bc = start + jnp.broadcast_to(jnp.arange(c), (b, c))
            at_b = jnp.clip(last_b - start, 0, c - 1)
            chunk_bv, h_bcd, cache = run(tokens_bc, positions_bc, cache, at_b, use_cache=True)
            here_b = (last_b >= start) & (last_b < start + c)
            h_nbcd = None if h_nbcd is None else jax.lax.dynamic_update_index_in_dim(h_nbcd, h_bcd, i, axis=0)
            return cache, jnp.where(here_b[:, None], chunk_bv, logits_bv), h_nbcd

        # Only the chunks up to the last prompt token run (no `lax.cond` per chunk: a GPU copies the cache for it).
        h_nbcd = jnp.zeros((t // c, b, c, self.config.dim), self.dtype) if hidden else None
        init = (cache, jnp.zeros((b, self.config.vocab_size), jnp.float32), h_nbcd)
        cache, logits_bv, h_nbcd = jax.lax.fori_loop(0, jnp.max(last_b) // c + 1, run_chunk, init)
        if not hidden:
            return logits_bv, cache
        return logits_bv, cache, jnp.moveaxis(h_nbcd, 0, 1).reshape(b, t, -1)

    def decode(self, tokens, positions, cache: KVCache, *, unroll=1, layers=None) -> tuple[jax.Array, KVCache]:
        """Feed `[B, T]` new tokens at `positions` `[B, T]`, attending over the cache (`forward`'s `layers`)."""
        return self.forward(tokens, positions, cache, use_cache=True, unroll=unroll, layers=layers)

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        *,
        use_cache: bool = False,
        unroll: int | bool = 1,
        segment_ids: jax.Array | None = None,
        remat: bool = False,
        layers: Sequence[BlockWeights] | None = None,
        logits_at: jax.Array | None = None,
        logits: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """The one forward pass behind `__call__`, `prefill` and `decode`.

        `logits=False` returns the final-normed hidden states `[B, T, D]` instead of the logits, for a
        caller that reads a few positions or columns (a reward, a classifier) without the `[B, T, V]` logits.

        `unroll`: the layer scan's unroll factor. `layers`: each layer's weights as arrays of their own
        (`decoding.layer_weights`), run one by one instead of the scan (`_layers`). `remat`
        rematerialises each layer in the backward pass (training): only the residual stream is kept.
        `logits_at` `[B, K]` int: the positions (indices into T) whose logits are wanted → `[B, K, V]`;
        None: every position, `[B, T, V]`.
        """
        spec = self.options.sharding
        with use_rules(spec.mesh, spec.rules) if spec else contextlib.nullcontext():
            x_btd = constrain(_embed(self.tok_embeddings[...], tokens).astype(self.dtype), ("batch", "seq", "embed"))
            inv_freq = rope.inverse_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
            sin, cos = rope.sin_cos(positions, inv_freq)

            step = {"options": self.options, "use_cache": use_cache, "segment_ids_bt": segment_ids}

            def run_block(w: BlockWeights, x_btd, cache, layer, ffn=None):
                with jax.named_scope("block"):
                    return w(x_btd, sin, cos, positions, cache, layer, ffn=ffn, **step)

            x_btd, cache = self._layers(run_block, x_btd, cache, layers=layers, unroll=unroll, remat=remat)
            h_btd = self.norm(x_btd)
            if logits_at is not None:
                h_btd = jnp.take_along_axis(h_btd, logits_at[:, :, None], axis=1)
            if not logits:
                return h_btd, cache
            return self.head(h_btd), cache

    def head(self, h_btd: jax.Array) -> jax.Array:
        """Final-normed hidden states `[B, T, D]` (`forward(..., logits=False)`) → float32 logits `[B, T, V]`."""
        spec = self.options.sharding
        with use_rules(spec.mesh, spec.rules) if spec else contextlib.nullcontext():
            out = jnp.einsum("btd,dv->btv", h_btd, self.output_weight(), preferred_element_type=jnp.float32)
            return constrain(out, ("batch", "seq", "vocab"))

    def layer_weights(self) -> tuple[BlockWeights, ...]:
        """Each layer's `BlockWeights`, row i of the stacked modules (the buffer itself, held `Unstacked`);
        an FP8 model's unquantized layers with their `dense_ffn` feed-forward in place of the unused FP8 slot."""
        fp8, n = self.options.fp8, self.config.n_layers
        out = []
        for i, slot in enumerate(fp8.dense_slots(n) if fp8 is not None else (-1,) * n):
            w = _row(self.layers, i).weights()
            out.append(dataclasses.replace(w, feed_forward=_row(self.dense_ffn, slot).weights()) if slot >= 0 else w)
        return tuple(out)

    def _layers(self, run_block, x_btd, cache, *, layers, unroll, remat):
        """The layer loop. Each layer's `BlockWeights` come from the decode step's own copy (`layers`, one
        array per weight, run in order), from the model's own buffers where it holds its layers `Unstacked`,
        or else are sliced from the stacked weights by a `lax.scan`. An FP8 model's unquantized layers run
        their FFN from `dense_ffn`: per-layer weights have it in place; the scan picks it per layer
        (`lax.cond` on the layer's slot)."""
        if layers is None and unstacked.held(nnx.state(self.layers)):
            layers = self.layer_weights()
        if layers is not None:
            block = jax.checkpoint(run_block, prevent_cse=False, static_argnums=(3,)) if remat else run_block
            for layer, w in enumerate(layers):
                x_btd, cache = block(w, x_btd, cache, layer)
            return x_btd, cache
        graphdef, layer_params = nnx.split(self.layers)
        dense = self.dense_ffn is not None
        if dense:
            dense_graphdef, dense_params = nnx.split(self.dense_ffn)
            dense_slots = jnp.asarray(self.options.fp8.dense_slots(self.config.n_layers), jnp.int32)

        def one_layer(carry, params):
            x_btd, cache, layer = carry
            w = nnx.merge(graphdef, params).weights()
            ffn = None
            if dense:
                slot = dense_slots[layer]

                def own_or_dense(x):
                    def from_dense(x):
                        one = jax.tree.map(lambda a: a[jnp.maximum(slot, 0)], dense_params)
                        return nnx.merge(dense_graphdef, one).weights()(x)

                    return jax.lax.cond(slot >= 0, from_dense, lambda x: w.feed_forward(x), x)

                ffn = own_or_dense
            x_btd, cache = run_block(w, x_btd, cache, layer, ffn)
            return (x_btd, cache, layer + 1), None

        if remat:
            one_layer = jax.checkpoint(one_layer, prevent_cse=False)
        (x_btd, cache, _), _ = jax.lax.scan(
            one_layer, (x_btd, cache, jnp.int32(0)), layer_params, length=self.config.n_layers, unroll=unroll
        )
        return x_btd, cache


def abstract(config: LlamaConfig, dtype=jnp.bfloat16, options: Options = Options()) -> Llama:
    """A `Llama` whose parameters are shape/dtype structs only: the one way every planner, loader and
    rebuild gets a model's structure (nothing is allocated)."""
    return nnx.eval_shape(lambda: Llama(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0), options=options))


def _embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows `tokens`; on a mesh a lone token as two (one index is a slice: a vocab-split table all-gathers)."""
    if tokens.size != 1 or rules.active() is None:
        return table[tokens]
    return table[jnp.broadcast_to(tokens.reshape(1), (2,))][:1].reshape(*tokens.shape, table.shape[1])


def _row(stacked: nnx.Module, i: int) -> nnx.Module:
    """Row i of a module stacked over layers."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state, is_leaf=lambda a: isinstance(a, Unstacked)))


def _stacked(make_one: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n modules whose parameters are stacked along a leading "layers" axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_one(rngs)

    return make(rngs)

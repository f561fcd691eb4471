"""The Llama 3.x decoder, whole, in one file: RMSNorm → attention (GQA, RoPE) → SwiGLU → block → stack.

Reads beside Meta's `llama_models/llama3/model.py`: same module and weight names (`wq`, `wk`, `wv`,
`wo`, `w1`, `w2`, `w3`, `attention_norm`, `ffn_norm`, `tok_embeddings`, `output`), same numerics
(norms, RoPE and softmax in float32, logits returned in float32).

Weights are stored input-dimension first so every projection is one readable einsum; each parameter
carries logical axis names (see `llama_jax/sharding/rules.py`), never mesh axes. Layers are stacked along a
leading "layers" axis and run under `lax.scan`, so compile time does not grow with depth. The decode
step instead runs the layers one by one from `LayerWeights` (`Llama.unstack_layers`): inside a loop,
XLA copies each slice of a stacked weight out of its buffer on every step; separate arrays are read
in place.

Dimension letters: B batch, T query positions, S key positions, D model, F ffn, N query heads,
K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import attention as attention_lib
from llama_jax import quant, rope
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import CACHE_AXES, KVCache
from llama_jax.sharding.rules import ShardingSpec, constrain, use_rules

# Prompt tokens per prefill step: bounds prefill activations ([B, chunk, F] in the FFN) at any length.
DEFAULT_PREFILL_CHUNK = 2048

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def _param(rngs: nnx.Rngs, init: Initializer, shape, dtype, names: tuple[str, ...]) -> nnx.Param:
    # eager_sharding=False: the weights are placed by the loader / `sharding`, not at construction.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


_normal = nnx.initializers.normal(stddev=0.02)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters (LoRA): each target projection W becomes W + (alpha / rank) · A B.

    targets: Meta names of the adapted projections, from `LORA_TARGETS`. A is initialised
    N(0, 1/in_features) and B at zero, so a fresh adapter leaves the model unchanged.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    dtype: str = "float32"  # adapter weights (trainable master copy); cast to the activation dtype in use

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {self.targets}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRA(nnx.Module):
    """The adapter of one projection whose weight is [*in, *out]: A [*in, R], B [R, *out] (`nnx.LoRAParam`)."""

    def __init__(self, in_shape, out_shape, in_names, out_names, spec: LoraSpec, *, rngs: nnx.Rngs):
        init_a = nnx.initializers.normal(stddev=1.0 / math.prod(in_shape) ** 0.5)
        self.scale = spec.scale
        self.a = nnx.LoRAParam(
            init_a(rngs.params(), (*in_shape, spec.rank), spec.dtype),
            out_sharding=(*in_names, "lora_rank"),
            eager_sharding=False,
        )
        self.b = nnx.LoRAParam(
            jnp.zeros((spec.rank, *out_shape), spec.dtype), out_sharding=("lora_rank", *out_names), eager_sharding=False
        )

    def __call__(self, spec: str, x: jax.Array) -> jax.Array:
        """The low-rank term of `einsum(spec, x, W)`, computed as (x A) B with R in the middle."""
        operands, out = spec.split("->")
        x_sub, w_sub = operands.split(",")
        contracted = "".join(c for c in w_sub if c in x_sub)
        produced = "".join(c for c in w_sub if c not in x_sub)
        kept = "".join(c for c in x_sub if c not in w_sub)
        x_r = jnp.einsum(f"{x_sub},{contracted}r->{kept}r", x, self.a[...].astype(x.dtype))
        return jnp.einsum(f"{kept}r,r{produced}->{out}", x_r, self.b[...].astype(x.dtype)) * jnp.asarray(
            self.scale, x.dtype
        )

    def delta(self) -> jax.Array:
        """A B · scale, shaped like the adapted weight (for merging)."""
        return jnp.tensordot(self.a[...], self.b[...], axes=1) * self.scale


def _project(spec: str, x: jax.Array, w: nnx.Param, lora: LoRA | None) -> jax.Array:
    """`einsum(spec, x, w)`, plus the adapter's low-rank term when the projection has one."""
    y = jnp.einsum(spec, x, w[...])
    return y if lora is None else y + lora(spec, x)


def _adapter(spec: LoraSpec | None, name: str, w: nnx.Param, n_in: int, rngs: nnx.Rngs) -> LoRA | None:
    if spec is None or name not in spec.targets:
        return None
    names = w.get_metadata()["out_sharding"]
    return LoRA(w.shape[:n_in], w.shape[n_in:], names[:n_in], names[n_in:], spec, rngs=rngs)


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

    def __init__(
        self, config: LlamaConfig, *, dtype, rngs: nnx.Rngs, lora: LoraSpec | None = None, fused: bool = False
    ):
        d, n, k, h = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = _param(rngs, _normal, (d, n, h), dtype, ("embed", "q_heads", "head_dim"))
        self.wk = _param(rngs, _normal, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.wv = _param(rngs, _normal, (d, k, h), dtype, ("embed", "kv_heads", "head_dim"))
        self.wo = _param(rngs, _normal, (n, h, d), dtype, ("q_heads", "head_dim", "embed"))
        self.wq_lora = _adapter(lora, "wq", self.wq, 1, rngs)
        self.wk_lora = _adapter(lora, "wk", self.wk, 1, rngs)
        self.wv_lora = _adapter(lora, "wv", self.wv, 1, rngs)
        self.wo_lora = _adapter(lora, "wo", self.wo, 2, rngs)
        # The decode copy's layout (`fuse_projections`): wq|wk|wv as one [D, N + 2K, H] weight, one dot.
        if fused:
            self.wqkv = nnx.Param(jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1))
            del self.wq, self.wk, self.wv
        else:
            self.wqkv = None

    def __call__(
        self,
        x_btd,
        sin,
        cos,
        positions_bt,
        cache: KVCache | None,
        layer,
        *,
        use_cache: bool,
        backend: str,
        block: int,
        segment_ids_bt=None,
    ):
        q_btnh, k_btkh, v_btkh = self._qkv(x_btd)
        q_btnh = constrain(rope.apply_rope(q_btnh, sin, cos), ("batch", "seq", "q_heads", "head_dim"))
        k_btkh = constrain(rope.apply_rope(k_btkh, sin, cos), ("batch", "seq", "kv_heads", "head_dim"))

        if cache is not None:
            cache = cache.write(layer, k_btkh, v_btkh, positions_bt[:, 0])
            # Pin the written cache to its own sharding. Left to propagation, a cache whose head axis
            # is replicated (fewer KV heads than the tensor axis) is re-split by the GQA attention
            # and all-gathered back: the whole cache, every decode step.
            cache = dataclasses.replace(cache, k=constrain(cache.k, CACHE_AXES), v=constrain(cache.v, CACHE_AXES))
        if use_cache:
            # Attend over the cache: position s is visible when s <= the query's position. The cache
            # reads its own layout (contiguous `KVCache`, or the engine's `PagedKVCache` of pages),
            # only up to the batch's furthest position.
            out_btnh = cache.attend(layer, q_btnh, positions_bt, backend=backend, block=block)
        else:
            # Attend within the chunk (full forward, or prefill of an empty cache): causal by index, and
            # with packed sequences (training) only within each token's own document.
            index_bt = jnp.broadcast_to(jnp.arange(x_btd.shape[1]), x_btd.shape[:2])
            out_btnh = attention_lib.attend(
                q_btnh,
                k_btkh,
                v_btkh,
                index_bt,
                segment_q_bt=segment_ids_bt,
                segment_kv_bs=segment_ids_bt,
                backend=backend,
                block=block,
                q_offset=False,
            )
        return self._output(out_btnh), cache

    def _qkv(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.wqkv is None:
            return (
                _project("btd,dnh->btnh", x_btd, self.wq, self.wq_lora),
                _project("btd,dkh->btkh", x_btd, self.wk, self.wk_lora),
                _project("btd,dkh->btkh", x_btd, self.wv, self.wv_lora),
            )
        n = self.wo.shape[0]
        k = (self.wqkv.shape[1] - n) // 2
        parts = jnp.split(jnp.einsum("btd,dch->btch", x_btd, self.wqkv[...]), [n, n + k], axis=2)
        adapters = (self.wq_lora, self.wk_lora, self.wv_lora)
        return tuple(y if a is None else y + a("btd,dch->btch", x_btd) for y, a in zip(parts, adapters, strict=True))

    def _output(self, out_btnh: jax.Array) -> jax.Array:
        """wo as one [B, T, N·H] × [N·H, D] dot (a bitcast of the stored [N, H, D]). As "btnh,nhd", XLA
        matched the attention output's layout by transposing the weight, every decode step."""
        n, h, d = self.wo.shape
        out_btf = out_btnh.reshape(*out_btnh.shape[:2], n * h)
        out_btd = jnp.einsum("btf,fd->btd", out_btf, self.wo[...].reshape(n * h, d))
        return out_btd if self.wo_lora is None else out_btd + self.wo_lora("btnh,nhd->btd", out_btnh)


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(x w1) * (x w3)).

    With `fp8` set, w1/w3/w2 are float8_e4m3fn with a float32 scale per output channel
    (`w1_scale` [F], `w3_scale` [F], `w2_scale` [D]) and the matmuls run from FP8 (`quant.fp8_linear`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype,
        rngs: nnx.Rngs,
        fp8: quant.Fp8Spec | None = None,
        lora: LoraSpec | None = None,
        fused: bool = False,
    ):
        d, f = config.dim, config.ffn_dim
        self.fp8 = fp8
        if fp8 is not None and lora is not None and {"w1", "w2", "w3"} & set(lora.targets):
            raise ValueError("LoRA on FP8 feed-forward weights is not supported: load the bf16 model to fine-tune it")
        init, wdtype = (_zeros, quant.FP8) if fp8 is not None else (_normal, dtype)
        self.w1 = _param(rngs, init, (d, f), wdtype, ("embed", "mlp"))
        self.w3 = _param(rngs, init, (d, f), wdtype, ("embed", "mlp"))
        self.w2 = _param(rngs, init, (f, d), wdtype, ("mlp", "embed"))
        if fp8 is not None:
            self.w1_scale = _param(rngs, nnx.initializers.ones, (f,), jnp.float32, ("mlp",))
            self.w3_scale = _param(rngs, nnx.initializers.ones, (f,), jnp.float32, ("mlp",))
            self.w2_scale = _param(rngs, nnx.initializers.ones, (d,), jnp.float32, ("embed",))
        self.w1_lora = _adapter(lora, "w1", self.w1, 1, rngs)
        self.w3_lora = _adapter(lora, "w3", self.w3, 1, rngs)
        self.w2_lora = _adapter(lora, "w2", self.w2, 1, rngs)
        # The decode copy's layout (`fuse_projections`): w1|w3 as one [D, 2F] weight (and scale), one dot.
        if not fused:
            self.w13 = None
        else:
            self.w13 = nnx.Param(jnp.concatenate([self.w1[...], self.w3[...]], axis=1))
            del self.w1, self.w3
            if fp8 is not None:
                self.w13_scale = nnx.Param(jnp.concatenate([self.w1_scale[...], self.w3_scale[...]]))
                del self.w1_scale, self.w3_scale

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        linear = None
        if self.fp8 is not None:
            linear = functools.partial(quant.fp8_linear, mode=self.fp8.matmul, scale_ub=self.fp8.activation_scale_ub)
        gate_btf, up_btf = self._gate_up(x_btd, linear)
        h_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "seq", "mlp"))
        if linear is not None:
            return linear(h_btf, self.w2[...], self.w2_scale[...])
        return _project("btf,fd->btd", h_btf, self.w2, self.w2_lora)

    def _gate_up(self, x_btd, linear) -> tuple[jax.Array, jax.Array]:
        """x w1 and x w3 (adapters included): two dots, or one over the fused w13."""
        if self.w13 is None:
            if linear is not None:
                return linear(x_btd, self.w1[...], self.w1_scale[...]), linear(x_btd, self.w3[...], self.w3_scale[...])
            return (
                _project("btd,df->btf", x_btd, self.w1, self.w1_lora),
                _project("btd,df->btf", x_btd, self.w3, self.w3_lora),
            )
        if linear is not None:
            y_btf = linear(x_btd, self.w13[...], self.w13_scale[...])
        else:
            y_btf = jnp.einsum("btd,df->btf", x_btd, self.w13[...])
        parts = jnp.split(y_btf, 2, axis=-1)
        adapters = (self.w1_lora, self.w3_lora)
        return tuple(y if a is None else y + a("btd,df->btf", x_btd) for y, a in zip(parts, adapters, strict=True))


class Block(nnx.Module):
    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype,
        rngs: nnx.Rngs,
        fp8: quant.Fp8Spec | None = None,
        lora: LoraSpec | None = None,
        fused: bool = False,
    ):
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.attention = Attention(config, dtype=dtype, rngs=rngs, lora=lora, fused=fused)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.feed_forward = FeedForward(config, dtype=dtype, rngs=rngs, fp8=fp8, lora=lora, fused=fused)

    def __call__(
        self, x_btd, sin, cos, positions_bt, cache, layer, *, use_cache, attention, ffn=None, segment_ids_bt=None
    ):
        """One block; `ffn`, when given, replaces this block's feed-forward (an FP8 model's dense layers)."""
        with jax.named_scope("attention"):
            attn, cache = self.attention(
                self.attention_norm(x_btd),
                sin,
                cos,
                positions_bt,
                cache,
                layer,
                use_cache=use_cache,
                **attention,
                segment_ids_bt=segment_ids_bt,
            )
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
      attention: the attention backend, one of `attention.BACKENDS` ("auto": `attention.select`'s rule,
        logged). `model.attention_block` is its key (and query) block: the blockwise backend's tile,
        a paged cache's page. `model.prefill_chunk`: prompt tokens per prefill step.
      fp8: FFN weights of `fp8.quantized_layers` in rowwise FP8 (the FP8 405B release); the other
        layers' FFNs live unquantized in `dense_ffn`, stacked over those layers only.
      lora: low-rank adapters on `lora.targets` (`nnx.LoRAParam`s `<name>_lora.a/.b` beside each
        adapted weight); see `llama_jax/lora.py` to add them to a loaded model and to merge them.
      score_labels: a sequence-classification head instead of the LM head (HF `LlamaForSequenceClassification`,
        e.g. a reward model): `score` [D, score_labels], and the model's "logits" are per-position scores
        `[B, T, score_labels]`; a classifier reads one position of `forward(..., head=False)` (`rejection.py`).
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.bfloat16,
        rngs: nnx.Rngs,
        attention: str = "auto",
        fp8: quant.Fp8Spec | None = None,
        lora: LoraSpec | None = None,
        score_labels: int | None = None,
    ):
        self.config = config
        self.fp8 = fp8
        self.lora = lora
        self.dtype = jnp.dtype(dtype)
        if attention not in attention_lib.BACKENDS:
            raise ValueError(f"attention must be one of {attention_lib.BACKENDS}, got {attention!r}")
        self.attention = attention
        self.attention_block = attention_lib.DEFAULT_BLOCK
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK
        # Set by `load(..., mesh=...)`: activations are then pinned by the same logical rules.
        self.sharding: ShardingSpec | None = None
        self.tok_embeddings = _param(rngs, _normal, (config.vocab_size, config.dim), dtype, ("vocab", "embed"))
        self.layers = _stacked(lambda r: Block(config, dtype=dtype, rngs=r, fp8=fp8, lora=lora), config.n_layers, rngs)
        dense = fp8.dense_layers(config.n_layers) if fp8 is not None else ()
        self.dense_ffn = (
            _stacked(lambda r: FeedForward(config, dtype=dtype, rngs=r), len(dense), rngs) if dense else None
        )
        self.norm = RMSNorm(config.dim, config.norm_eps, dtype=dtype, rngs=rngs)
        self.output = (
            None
            if config.tie_embeddings or score_labels
            else _param(rngs, _normal, (config.dim, config.vocab_size), dtype, ("embed", "vocab"))
        )
        # Few labels: replicated (None), a [D, 1] head is not worth splitting.
        self.score = _param(rngs, _normal, (config.dim, score_labels), dtype, ("embed", None)) if score_labels else None

    def head(self) -> jax.Array:
        """The output head `[D, V]` (`[D, labels]` with a score head), in the activation dtype."""
        if self.score is not None:
            head_dv = self.score[...]
        else:
            head_dv = self.tok_embeddings[...].T if self.output is None else self.output[...]
        return head_dv.astype(self.dtype)

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

    def prefill(
        self, tokens: jax.Array, cache: KVCache, lengths: jax.Array | None = None, *, chunk: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Run prompts `[B, T]` (positions 0..T-1, right-padded) into an empty cache.

        → (float32 logits `[B, V]` of each row's last prompt token, at `lengths - 1` (default T - 1), cache).
        Only those B rows go through the vocabulary projection, never all `[B, T, V]`.

        A prompt longer than `chunk` (default `self.prefill_chunk`) runs as a `lax.scan` over chunks of
        that many tokens, each attending over the cache the chunks before it filled: activations stay
        `[B, chunk, ...]` whatever T is, and the one compiled chunk body serves every chunk.
        """
        b, t = tokens.shape
        last_b = jnp.full((b,), t - 1, jnp.int32) if lengths is None else lengths - 1
        c = min(chunk or self.prefill_chunk, t)
        if t == c:  # one chunk: causal within it (the fused kernels' own causal mask applies)
            positions = jnp.broadcast_to(jnp.arange(t), tokens.shape)
            logits_b1v, cache = self.forward(tokens, positions, cache, logits_at=last_b[:, None])
            return logits_b1v[:, 0], cache
        if t % c:
            raise ValueError(f"prefill: the prompt length {t} must be a multiple of the chunk ({c})")

        def run_chunk(carry, start):
            cache, logits_bv = carry
            tokens_bc = jax.lax.dynamic_slice_in_dim(tokens, start, c, axis=1)
            positions_bc = start + jnp.broadcast_to(jnp.arange(c), (b, c))
            at_b = jnp.clip(last_b - start, 0, c - 1)
            chunk_b1v, cache = self.forward(tokens_bc, positions_bc, cache, use_cache=True, logits_at=at_b[:, None])
            here_b = (last_b >= start) & (last_b < start + c)
            return cache, jnp.where(here_b[:, None], chunk_b1v[:, 0], logits_bv)

        def one_chunk(carry, i):
            # Chunks past every row's prompt (bucket padding) are skipped: the cost follows the prompt.
            start = i * c
            return jax.lax.cond(start <= jnp.max(last_b), run_chunk, lambda carry, _: carry, carry, start), None

        init = (cache, jnp.zeros((b, self.config.vocab_size), jnp.float32))
        (cache, logits_bv), _ = jax.lax.scan(one_chunk, init, jnp.arange(t // c))
        return logits_bv, cache

    def decode(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        *,
        unroll: int | bool = 1,
        layers: LayerWeights | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Feed `[B, T]` new tokens at `positions` `[B, T]`, attending over the cache.

        With `layers` (from `unstack_layers`) every weight is read in place; without, from the stacked scan.
        """
        return self.forward(tokens, positions, cache, use_cache=True, unroll=unroll, layers=layers)

    def unstack_layers(self, fuse: bool | None = None) -> LayerWeights:
        """Each layer's weights as separate arrays, for `decode(..., layers=...)`: one copy of the layer
        weights (the stacked ones stay, for the scan of `__call__`, prefill and training).

        fuse: store wq|wk|wv as one `[D, N + 2K, H]` weight and w1|w3 as one `[D, 2F]` (FP8: with their
        scales), so a decode step runs 4 projection dots per layer instead of 7. Default: on a single
        device. On a mesh the head and FFN axes are split over the tensor axis, where a concatenated
        axis would put q, k and v rows on the wrong devices, so the projections stay separate there.
        """
        fuse = self.sharding is None if fuse is None else fuse
        dense = nnx.state(self.dense_ffn) if self.dense_ffn is not None else None
        return _unstack(nnx.state(self.layers), dense, fuse=fuse)

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
        layers: LayerWeights | None = None,
        logits_at: jax.Array | None = None,
        head: bool = True,
    ) -> tuple[jax.Array, KVCache | None]:
        """The one forward pass behind `__call__`, `prefill` and `decode`.

        `head=False` returns the final-normed hidden states `[B, T, D]` instead of the logits, for a
        caller that reads a few positions or columns (a reward, a classifier) without the `[B, T, V]` logits.

        `unroll` is handed to the layer scan: 1 keeps compile time flat in depth.
        `layers` (from `unstack_layers`) replaces the scan by one block per layer, each reading its own
        arrays: no per-step copy out of the stacked buffers, at a compile time linear in depth.
        `remat` rematerialises each layer in the backward pass (training): only the residual stream
        between layers is kept, `[L, B, T, D]`, instead of every layer's activations.
        `logits_at` `[B, K]` int: the positions (indices into T) whose logits are wanted → `[B, K, V]`;
        None: every position, `[B, T, V]`.
        """
        with use_rules(self.sharding.mesh, self.sharding.rules) if self.sharding else contextlib.nullcontext():
            return self._forward(
                tokens,
                positions,
                cache,
                use_cache=use_cache,
                unroll=unroll,
                segment_ids=segment_ids,
                remat=remat,
                layers=layers,
                logits_at=logits_at,
                head=head,
            )

    def _forward(self, tokens, positions, cache, *, use_cache, unroll, segment_ids, remat, layers, logits_at, head):
        config = self.config
        x_btd = constrain(self.tok_embeddings[...][tokens].astype(self.dtype), ("batch", "seq", "embed"))
        inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        sin, cos = rope.sin_cos(positions, inv_freq)

        backend = {"backend": self.attention, "block": self.attention_block}

        def run_block(block, x_btd, cache, layer, ffn=None):
            with jax.named_scope("block"):
                return block(
                    x_btd,
                    sin,
                    cos,
                    positions,
                    cache,
                    layer,
                    use_cache=use_cache,
                    attention=backend,
                    ffn=ffn,
                    segment_ids_bt=segment_ids,
                )

        if layers is None:
            x_btd, cache = self._scan_layers(run_block, x_btd, cache, unroll=unroll, remat=remat)
        else:
            block_def, ffn_def = self._layer_graphdefs(layers.fused)
            slots = self.fp8.dense_slots(config.n_layers) if self.fp8 is not None else (-1,) * config.n_layers
            for layer, (params, slot) in enumerate(zip(layers.blocks, slots, strict=True)):
                # FP8 model: the layers the release left unquantized run their FFN from `dense_ffn`.
                ffn = nnx.merge(ffn_def, layers.dense_ffn[slot]) if slot >= 0 else None
                x_btd, cache = run_block(nnx.merge(block_def, params), x_btd, cache, layer, ffn)
        h_btd = self.norm(x_btd)
        if logits_at is not None:
            h_btd = jnp.take_along_axis(h_btd, logits_at[:, :, None], axis=1)
        if not head:
            return h_btd, cache
        logits = jnp.einsum("btd,dv->btv", h_btd, self.head(), preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab")), cache

    def _layer_graphdefs(self, fused: bool):
        """The module structure of one `LayerWeights` block and dense FFN: the stacked modules' own, or
        their fused-projection variants (`Block(fused=True)`), built abstractly."""
        if not fused:
            return nnx.graphdef(self.layers), self.dense_ffn and nnx.graphdef(self.dense_ffn)
        c, dtype, fp8, lora = self.config, self.dtype, self.fp8, self.lora
        block = nnx.eval_shape(lambda: Block(c, dtype=dtype, rngs=nnx.Rngs(0), fp8=fp8, lora=lora, fused=True))
        ffn = (
            nnx.eval_shape(lambda: FeedForward(c, dtype=dtype, rngs=nnx.Rngs(0), fused=True))
            if self.dense_ffn
            else None
        )
        return nnx.graphdef(block), ffn and nnx.graphdef(ffn)

    def _scan_layers(self, run_block, x_btd, cache, *, unroll, remat):
        config = self.config
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

            x_btd, cache = run_block(block, x_btd, cache, layer, ffn)
            return (x_btd, cache, layer + 1), None

        if remat:
            one_layer = jax.checkpoint(one_layer, prevent_cse=False)
        (x_btd, cache, _), _ = jax.lax.scan(
            one_layer, (x_btd, cache, jnp.int32(0)), layer_params, length=config.n_layers, unroll=unroll
        )
        return x_btd, cache


@functools.partial(jax.tree_util.register_dataclass, data_fields=("blocks", "dense_ffn"), meta_fields=("fused",))
@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """Each layer's parameters as separate arrays (`Llama.unstack_layers`), for the decode step.

    Inside the decode `while_loop` XLA materialises every static slice of a stacked `[L, ...]` weight
    on every step (a `slice` fusion per weight, per layer, per step: ~3x the bytes the step must
    read); arrays of their own are read in place by the dots.
    """

    blocks: tuple[dict, ...]  # L `Block` states (pure dicts)
    dense_ffn: tuple[dict, ...]  # FP8 models: the unquantized `FeedForward` states, one per `dense_ffn` row
    fused: bool = False  # wq|wk|wv and w1|w3 concatenated: the layout of `Block(fused=True)`


@functools.partial(jax.jit, static_argnames="fuse")
def _unstack(blocks: nnx.State, dense: nnx.State | None, *, fuse: bool) -> LayerWeights:
    def rows(tree, fuse_row):
        if tree is None:
            return ()
        pure = nnx.to_pure_dict(tree)
        n = jax.tree.leaves(pure)[0].shape[0]
        one = [jax.tree.map(lambda a, i=i: a[i], pure) for i in range(n)]
        return tuple(map(fuse_row, one) if fuse else one)

    return LayerWeights(rows(blocks, _fuse_block), rows(dense, _fuse_ffn), fused=fuse)


def _fuse_ffn(ffn: dict) -> dict:
    """A `FeedForward` state → `FeedForward(fused=True)`'s: w13 = [w1 | w3] (and their scales)."""
    ffn = dict(ffn)
    ffn["w13"] = jnp.concatenate([ffn.pop("w1"), ffn.pop("w3")], axis=1)
    if "w1_scale" in ffn:
        ffn["w13_scale"] = jnp.concatenate([ffn.pop("w1_scale"), ffn.pop("w3_scale")])
    return ffn


def _fuse_block(block: dict) -> dict:
    """A `Block` state → `Block(fused=True)`'s: wqkv = [wq | wk | wv] along the heads, w13 = [w1 | w3]."""
    attention = dict(block["attention"])
    attention["wqkv"] = jnp.concatenate([attention.pop(name) for name in ("wq", "wk", "wv")], axis=1)
    return {**block, "attention": attention, "feed_forward": _fuse_ffn(block["feed_forward"])}


def _stacked(make_one: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n modules whose parameters are stacked along a leading "layers" axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return make_one(rngs)

    return make(rngs)

"""The attention backends against the dense reference, the selection rule, chunked prefill and long decode."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.model import attention, blockwise
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.model import Llama
from llama_jax.model.options import Options

BOUND = 1e-5  # fp32: max|diff| / max|ref|


def _relative(out, ref, rows_ok):
    out, ref = np.asarray(out), np.asarray(ref)
    return float(np.abs(out - ref)[rows_ok].max() / np.abs(ref[rows_ok]).max())


# (batch, query length, key length, query heads, kv heads, block): MHA, GQA, MQA, blocks that do
# and do not divide the lengths, one query (decode), one block covering everything.
SHAPES = [
    (2, 37, 37, 4, 4, 8),
    (3, 64, 100, 8, 2, 16),
    (2, 1, 75, 6, 1, 16),
    (1, 50, 50, 4, 2, 64),
    (2, 33, 130, 4, 1, 32),
]


def _problem(b, t, s, n, k, segments, seed):
    """Random q/k/v, ragged rows (each row's queries at its own offset into the keys, as a prefill chunk
    in a cache) and optionally packed segments; → (q, k, v, index, segment kwargs, rows that see a key)."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, n, 16)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, s, k, 16)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, s, k, 16)), jnp.float32)
    start = rng.integers(0, s - t + 1, b)
    index = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
    seg = {}
    if segments:
        seg_kv = np.sort(rng.integers(0, 3, (b, s)), axis=1)
        seg = dict(
            segment_q_bt=jnp.asarray(np.take_along_axis(seg_kv, np.asarray(index), 1)),
            segment_kv_bs=jnp.asarray(seg_kv),
        )
    rows_ok = np.asarray(attention.visible(index, s, *seg.values()).any(-1))
    return q, keys, values, index, seg, rows_ok


@pytest.mark.parametrize("b, t, s, n, k, block", SHAPES)
@pytest.mark.parametrize("segments", [False, True])
def test_blockwise_equals_dense_with_ragged_rows_and_packed_segments(b, t, s, n, k, block, segments):
    q, keys, values, index, seg, rows_ok = _problem(b, t, s, n, k, segments, seed=b * 1000 + t + s + n + k)
    ref = attention.attend(q, keys, values, index, backend="dense", **seg)
    # Query tiles of half the key block: several tiles, each over its own (dynamic) number of key blocks.
    out = attention.attend(q, keys, values, index, backend="blockwise", block=block, block_q=max(block // 2, 4), **seg)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _relative(out, ref, rows_ok) <= BOUND


@pytest.mark.parametrize("b, t, s, n, k, block", [SHAPES[0], SHAPES[1], SHAPES[4]])  # MHA, GQA, MQA
@pytest.mark.parametrize("segments", [False, True])
def test_blockwise_gradient_is_the_dense_gradient(b, t, s, n, k, block, segments):
    """The flash backward (recomputed from the saved logsumexp) against jax.grad of the dense reference."""
    q, keys, values, index, seg, rows_ok = _problem(b, t, s, n, k, segments, seed=t + s)
    weights = jnp.asarray(np.random.default_rng(s).standard_normal(q.shape), jnp.float32) * rows_ok[:, :, None, None]

    def loss(backend):
        def f(q, keys, values):
            out = attention.attend(q, keys, values, index, backend=backend, block=block, block_q=block // 2, **seg)
            return jnp.sum(out * weights)

        return jax.grad(f, argnums=(0, 1, 2))

    got, want = loss("blockwise")(q, keys, values), loss("dense")(q, keys, values)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and _relative(g, w, np.ones(g.shape[:2], bool)) <= BOUND


def test_blockwise_gradient_memory_is_not_quadratic():
    """At 8,192 tokens the dense backward's float32 [B, N, T, T] scores alone take 1 GiB (x2 with the
    softmax's); the blockwise backward's temporaries stay under 1/20 of that (what XLA allocates)."""
    t = 8192
    shape = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    index = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def grad(backend):
        f = lambda q, k, v, i: jnp.sum(attention.attend(q, k, v, i, backend=backend, q_offset=False))  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(shape, kv, kv, index).compile().memory_analysis()

    scores = attention.dense_score_bytes(1, 4, t, t)
    assert grad("dense").temp_size_in_bytes >= scores  # the check can fail
    assert grad("blockwise").temp_size_in_bytes <= scores / 20


def test_decode_reads_only_the_filled_key_blocks():
    """A one-query step at position p runs ceil((p + 1) / block) key blocks, whatever the cache length:
    keys past the furthest position are never read (here: NaN there changes nothing)."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 8)), jnp.float32)
    k, v = (np.asarray(rng.standard_normal((2, 256, 2, 8)), np.float32) for _ in range(2))
    index = jnp.asarray([[40], [70]], jnp.int32)
    k[:, 128:], v[:, 128:] = np.nan, np.nan  # blocks 2 and 3 of 32: beyond position 70
    out = attention.attend(q, jnp.asarray(k), jnp.asarray(v), index, backend="blockwise", block=64)
    ref = attention.attend(q, jnp.asarray(k[:, :128]), jnp.asarray(v[:, :128]), index, backend="dense")
    assert np.isfinite(np.asarray(out)).all()
    assert _relative(out, ref, np.ones((2, 1), bool)) <= BOUND


def test_select_rule_is_logged_and_checks_what_it_is_asked(caplog):
    common = dict(q_len=4096, kv_len=4096, batch=1, n_heads=32)
    with caplog.at_level(logging.INFO, logger="llama_jax.model.attention"):
        assert attention.select("auto", platform="cpu", dtype=jnp.float32, **common) == "blockwise"
    assert "attention: blockwise" in caplog.text
    assert attention.select("auto", platform="gpu", dtype=jnp.bfloat16, **common) == "cudnn"
    assert attention.select("auto", platform="gpu", dtype=jnp.float32, **common) == "blockwise"  # 2 GiB of scores
    assert attention.select("auto", platform="gpu", dtype=jnp.float32, q_len=1, kv_len=512) == "dense"
    splash = dict(q_offset=False, kernel_fits=True)
    assert attention.select("auto", platform="tpu", dtype=jnp.bfloat16, **splash, **common) == "splash"
    # Not where the mesh splits the sequence (or heads otherwise than kv heads): `attention.splash_split`.
    assert attention.select("auto", platform="tpu", dtype=jnp.bfloat16, q_offset=False, **common) == "blockwise"
    # A decode step: the GPU's Triton decode kernel where it serves the layer (`KVCache.attend` says), which
    # reads each row's filled keys in place, not the cache's bucket; a TPU's the dense read (docs/TARGETS.md).
    decode = dict(q_len=1, kv_len=4096)
    assert attention.select("auto", platform="gpu", dtype=jnp.bfloat16, **decode, kernel_fits=True) == "triton"
    assert attention.select("auto", platform="gpu", dtype=jnp.bfloat16, **decode) == "dense"
    assert attention.select("auto", platform="gpu", dtype=jnp.float32, **decode, kernel_fits=True) == "dense"
    assert attention.select("auto", platform="tpu", dtype=jnp.bfloat16, **decode) == "dense"
    assert attention.select("blockwise", platform="tpu", dtype=jnp.bfloat16, **decode) == "blockwise"
    assert attention.select("dense", platform="cpu", dtype=jnp.float32, **common) == "dense"
    with pytest.raises(ValueError, match="bfloat16 and float16 only"):
        attention.select("cudnn", platform="gpu", dtype=jnp.float32, **common)
    with pytest.raises(ValueError, match="needs a TPU"):
        attention.select("splash", platform="cpu", dtype=jnp.bfloat16, q_offset=False, **common)
    with pytest.raises(ValueError, match="must be one of"):
        attention.select("flash", platform="cpu", dtype=jnp.float32, **common)
    with pytest.raises(ValueError, match="must be one of"):
        Options(attention_backend="flash")


@pytest.mark.parametrize("segments", [False, True])
def test_splash_runs_on_each_devices_rows_and_kv_heads_of_a_mesh_as_one_device_does(segments):
    """A Mosaic kernel is not partitioned by the compiler (prefill and training on any multi-chip TPU mesh
    failed to compile: "Mosaic kernels cannot be automatically partitioned"): splash runs under shard_map,
    each device over its own rows and kv heads with their query heads. Pallas interpret mode, 2x2 mesh,
    GQA, packed documents; a mesh splitting query heads where kv heads cannot follow is refused."""
    from llama_jax.sharding import rules as sharding_rules
    from llama_jax.weights import placement

    b, t, n, k = 2, 256, 8, 4
    q, keys, values, index, seg, _ = _problem(b, t, t, n, k, segments, seed=11)
    index = jnp.broadcast_to(jnp.arange(t), (b, t))  # the uncached forward: splash's static causal mask
    if segments:
        ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1))
        seg = dict(segment_q_bt=ids, segment_kv_bs=ids)
    want = attention.attend(q, keys, values, index, backend="dense", **seg)
    args = (q, keys, values, seg.get("segment_q_bt"), seg.get("segment_kv_bs"))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tensor"))
    spec = placement.sharding_spec(mesh, "fsdp_tp")
    with sharding_rules.use_rules(spec.mesh, spec.rules):
        split = attention.splash_split(q.shape, keys.shape)
        assert split[0] == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
        got = jax.jit(lambda *a: attention._splash(*a, split))(*args)
    assert _relative(got, want, slice(None)) <= BOUND
    # kv_rep: the query heads split over 8 devices, each of the 4 kv heads copied on the 2 that use it.
    kv_rep = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("kv_rep", "tensor"))
    with sharding_rules.use_rules(kv_rep, placement.sharding_spec(kv_rep, "fsdp_tp").rules):
        split = attention.splash_split(q.shape, keys.shape)
        assert split[0][2] == ("tensor", "kv_rep") and split[1][2] == "tensor"
        got = jax.jit(lambda *a: attention._splash(*a, split))(*args)
    assert _relative(got, want, slice(None)) <= BOUND
    wide = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(1, 8), ("fsdp", "tensor"))
    with sharding_rules.use_rules(wide, placement.sharding_spec(wide, "fsdp_tp").rules):
        assert attention.splash_split(q.shape, keys.shape) is None  # 4 kv heads cannot follow 8 query shards


_CONFIG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=4096)


def test_a_long_cache_is_read_in_larger_tiles_of_whole_pages():
    page = attention.DEFAULT_BLOCK
    assert blockwise.cached_tiles(2048, blockwise.LONG_CACHE - 1, page) == (blockwise.DEFAULT_BLOCK_Q, page)
    for q_len in (1, 2048):
        for kv_len in (blockwise.LONG_CACHE, blockwise.LONGER_CACHE, 131_072):
            block_q, block_k = blockwise.cached_tiles(q_len, kv_len, page)
            assert block_q > blockwise.DEFAULT_BLOCK_Q and block_k >= page and block_k % page == 0
    assert blockwise.cached_tiles(1, 131_072, 256)[1] == blockwise.DECODE_BLOCK_K
    assert blockwise.cached_tiles(2048, 131_072, 768) == (1024, 768)  # a page larger than the target: one


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_the_cache_attends_over_what_it_wrote_as_attend_does_over_the_same_keys(backend):
    """Keys and values written into a `KVCache` (kv heads before positions, `[L, B, K, S, H]`) at each
    row's own positions, then attended where they lie (the dense read's dots, or the blockwise loop's
    key blocks): equal to `attend` over the same keys as plain `[B, S, K, H]` arrays. GQA, ragged rows."""
    b, s, n, k, t = 3, 40, 6, 2, 4
    config = LlamaConfig(vocab_size=8, dim=16 * n, n_layers=2, n_heads=n, n_kv_heads=k, ffn_dim=16, max_seq_len=s)
    q, keys, values, _, _, _ = _problem(b, t, s, n, k, segments=False, seed=5)
    start = jnp.asarray([0, 17, 36], jnp.int32)  # each row's first new position; the last ends the cache
    index = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    cache = KVCache.zeros(config, b, s, jnp.float32)
    for layer in range(2):  # layer 1 holds the keys, layer 0 their negation: the layers stay apart
        sign = 1 if layer else -1
        new_k, new_v = (sign * jnp.take_along_axis(x, index[:, :, None, None], axis=1) for x in (keys, values))
        cache = cache.write(layer, new_k, new_v, start)
    assert cache.k.shape == (2, b, k, s, 16)
    out = cache.attend(1, q, index, backend=backend, block=16)
    # Only the written entries are set; the rest are zeros in both.
    written = jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], index].set(True)[:, :, None, None]
    ref = attention.attend(q, jnp.where(written, keys, 0), jnp.where(written, values, 0), index, backend="dense")
    assert _relative(out, ref, slice(None)) <= BOUND


@pytest.mark.parametrize("tiles", ["pages", "long_cache_tiles"])
def test_chunked_prefill_and_decode_at_long_positions_equal_the_uncached_forward(tiles, monkeypatch):
    """A 3,000-token ragged batch prefilled in 512-token chunks over 256-entry key blocks, then decoded
    at positions up to ~3,000: every logit equals one dense uncached forward of the whole sequence.
    long_cache_tiles: the same cache read as a long one is (`blockwise.cached_tiles`), in key blocks of
    several pages (1,024 for the chunks, 2,048 for decode, neither dividing the 3,584 entries)."""
    if tiles == "long_cache_tiles":
        monkeypatch.setattr(blockwise, "LONG_CACHE", 0)
        monkeypatch.setattr(blockwise, "LONGER_CACHE", 0)
    model = Llama(_CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0), options=Options(attention_block=256))
    reference = model.with_options(attention_backend="dense")
    rng = np.random.default_rng(2)
    lengths = np.asarray([3072, 2049])  # one row ends a chunk exactly, one just past a boundary
    tokens = jnp.asarray(rng.integers(0, 128, (2, 3072 + 3)), jnp.int32)
    logits_bv, cache = model.prefill(
        tokens[:, :3072], KVCache.zeros(_CONFIG, 2, 3584, jnp.float32), jnp.asarray(lengths), chunk=512
    )
    full = reference(tokens)
    want = np.stack([full[0, lengths[0] - 1], full[1, lengths[1] - 1]])
    assert _relative(logits_bv, want, slice(None)) <= BOUND
    for step in range(3):
        positions = jnp.asarray(lengths + step)[:, None]
        new = jnp.take_along_axis(tokens, positions, axis=1)
        logits_b1v, cache = model.decode(new, positions, cache)
        # Row 0's tokens follow on in `tokens`; row 1 is fed tokens[1, 2049 + step] (its own next ones).
        want = np.stack([full[0, lengths[0] + step], full[1, lengths[1] + step]])
        assert _relative(logits_b1v[:, 0], want, slice(None)) <= BOUND


# head_dim 128, the fused kernels' shape
_LOWERING_CONFIG = LlamaConfig(
    vocab_size=256, dim=256, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=256, max_seq_len=1024
)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_a_chunked_prefill_lowers_for_tpu_and_cuda(platform, monkeypatch, caplog):
    """A 512-token bf16 prompt in 256-token chunks, lowered from this CPU. cuda: every chunk runs cuDNN's
    fused kernel at its offset (an explicit mask). tpu: splash's mask is static, so the chunks at an offset
    run blockwise, or dense while the scores are small as here (logged); no Mosaic kernel in the program."""
    from jax._src.cudnn import fused_attention_stablehlo

    from llama_jax.model import platform as platform_module

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)  # no CUDA plugin here
    model = Llama(_LOWERING_CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    cache = jax.eval_shape(lambda: KVCache.zeros(_LOWERING_CONFIG, 2, 512, jnp.bfloat16))
    prefill = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).prefill(t, c, chunk=256))
    with caplog.at_level(logging.INFO, logger="llama_jax.model.attention"), platform_module.lowering_for(platform):
        text = prefill.trace(params, tokens, cache).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" in text  # the chunk scan
    if platform == "cuda":
        assert "__cudnn$fmha" in text and "attention: cudnn" in caplog.text
    else:
        assert "tpu_custom_call" not in text
        assert "splash not used: queries at a traced offset" in caplog.text and "attention: splash (" not in caplog.text

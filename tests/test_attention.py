"""The attention backends against the dense reference, the selection rule, chunked prefill and long decode."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import attention
from llama_jax.config import LlamaConfig
from llama_jax.kv_cache import KVCache
from llama_jax.model import Llama

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


@pytest.mark.parametrize("b, t, s, n, k, block", SHAPES)
@pytest.mark.parametrize("segments", [False, True])
def test_blockwise_equals_dense_with_ragged_rows_and_packed_segments(b, t, s, n, k, block, segments):
    rng = np.random.default_rng(b * 1000 + t + s + n + k)
    q = jnp.asarray(rng.standard_normal((b, t, n, 16)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((b, s, k, 16)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, s, k, 16)), jnp.float32)
    # Ragged rows: each row's queries sit at its own positions in the cache (a prefill chunk at an offset).
    start = rng.integers(0, s - t + 1, b)
    index = jnp.asarray(start[:, None] + np.arange(t)[None], jnp.int32)
    seg = {}
    if segments:
        seg_kv = np.sort(rng.integers(0, 3, (b, s)), axis=1)
        seg = dict(segment_q_bt=jnp.asarray(np.take_along_axis(seg_kv, np.asarray(index), 1)),
                   segment_kv_bs=jnp.asarray(seg_kv))  # fmt: skip
    ref = attention.attend(q, keys, values, index, backend="dense", **seg)
    out = attention.attend(q, keys, values, index, backend="blockwise", block=block, **seg)
    assert out.shape == q.shape and out.dtype == q.dtype
    rows_ok = np.asarray(attention.visible(index, s, *seg.values()).any(-1)) if segments else np.ones((b, t), bool)
    assert _relative(out, ref, rows_ok) <= BOUND


def test_blockwise_gradient_is_the_dense_gradient():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 24, c, 8)), jnp.float32) for c in (4, 2, 2))
    index = jnp.broadcast_to(jnp.arange(24), (2, 24))

    def loss(backend):
        return lambda q, k, v: jnp.sum(attention.attend(q, k, v, index, backend=backend, block=8) ** 2)

    for got, want in zip(jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v), strict=True):  # fmt: skip
        assert _relative(got, want, np.ones(got.shape[:2], bool)) <= BOUND


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
    with caplog.at_level(logging.INFO, logger="llama_jax.attention"):
        assert attention.select("auto", platform="cpu", dtype=jnp.float32, **common) == "blockwise"
    assert "attention: blockwise" in caplog.text
    assert attention.select("auto", platform="gpu", dtype=jnp.bfloat16, **common) == "cudnn"
    assert attention.select("auto", platform="gpu", dtype=jnp.float32, **common) == "blockwise"  # 2 GiB of scores
    assert attention.select("auto", platform="gpu", dtype=jnp.float32, q_len=1, kv_len=512) == "dense"
    assert attention.select("auto", platform="tpu", dtype=jnp.bfloat16, q_offset=False, **common) == "splash"
    assert attention.select("auto", platform="tpu", dtype=jnp.bfloat16, q_len=1, kv_len=4096) == "dense"
    assert attention.select("dense", platform="cpu", dtype=jnp.float32, **common) == "dense"
    with pytest.raises(ValueError, match="bfloat16 and float16 only"):
        attention.select("cudnn", platform="gpu", dtype=jnp.float32, **common)
    with pytest.raises(ValueError, match="needs a TPU"):
        attention.select("splash", platform="cpu", dtype=jnp.bfloat16, q_offset=False, **common)
    with pytest.raises(ValueError, match="must be one of"):
        attention.select("flash", platform="cpu", dtype=jnp.float32, **common)
    with pytest.raises(ValueError, match="must be one of"):
        Llama(_CONFIG, rngs=nnx.Rngs(0), attention="flash")


_CONFIG = LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=4096)


def test_chunked_prefill_and_decode_at_long_positions_equal_the_uncached_forward():
    """A 3,000-token ragged batch prefilled in 512-token chunks over 256-entry key blocks, then decoded
    at positions up to ~3,000: every logit equals one dense uncached forward of the whole sequence."""
    model = Llama(_CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    model.attention_block = 256
    reference = Llama(_CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0), attention="dense")
    rng = np.random.default_rng(2)
    lengths = np.asarray([3072, 2049])  # one row ends a chunk exactly, one just past a boundary
    tokens = jnp.asarray(rng.integers(0, 128, (2, 3072 + 3)), jnp.int32)
    logits_bv, cache = model.prefill(tokens[:, :3072], KVCache.zeros(_CONFIG, 2, 3584, jnp.float32),
                                     jnp.asarray(lengths), chunk=512)  # fmt: skip
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

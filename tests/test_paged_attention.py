"""Fused decode attention (llama_jax.model.paged_attention): the TPU (Mosaic) and GPU (Triton) Pallas paged
kernels, run here in Pallas interpret mode, give what the blockwise loop gives over the same pages, read
only each row's own filled pages, and are what the engine runs where `attention.select_paged` says; the GPU's
split-K Triton kernel over `generate`'s contiguous cache layer gives what the dense read gives, reads only
each row's filled entries, and is what `generate` decodes with on a GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax.inference import engine as engine_module
from llama_jax.inference.engine import Engine, Request
from llama_jax.inference.sampling import SamplingParams
from llama_jax.jobs import jobs
from llama_jax.model import attention, platform
from llama_jax.model.paged_cache import NULL_PAGE, PagedKVCache, pool_shape
from tests import checkpoints

# Tiny, but with what the kernels must get right: GQA (4 query heads per kv head), rows of different
# lengths ending mid-page, pages in no order, a table wider than any row, the null page in its tail.
K, G, H, PAGE, BLOCK_PAGES, M, N_PAGES = 2, 4, 128, 16, 2, 8, 40
LENGTHS = (37, 1, 100, 16)  # mid-page, one entry, mid-page late in the row, exactly one page
TOLERANCE = {"triton": 1e-5, "mosaic": 2e-2}  # the TPU interpreter multiplies in bf16 passes, as a TPU does


def _pages(rng):
    """A `[B, M]` table: each row's pages drawn out of order from the pool, NULL_PAGE past its length."""
    table = np.full((len(LENGTHS), M), NULL_PAGE, np.int32)
    free = rng.permutation(np.arange(1, N_PAGES))
    for b, length in enumerate(LENGTHS):
        n = -(-length // PAGE)
        table[b, :n], free = free[:n], free[n:]
    return table


def _caches(kernel, rng):
    """The same K/V entries in the blockwise pool and in `kernel`'s pool, and the queries."""
    config = dataclasses.make_dataclass("C", ["n_layers", "n_kv_heads", "head_dim"])(2, K, H)
    k_lpskh, v_lpskh = (rng.normal(size=pool_shape(config, N_PAGES, PAGE)).astype(np.float32) for _ in range(2))
    table = jnp.asarray(_pages(rng))
    reference = PagedKVCache(jnp.asarray(k_lpskh), jnp.asarray(v_lpskh), table, BLOCK_PAGES)
    heads_first = [jnp.asarray(np.moveaxis(x, 3, 0)) for x in (k_lpskh, v_lpskh)]
    assert heads_first[0].shape == pool_shape(config, N_PAGES, PAGE, kernel)
    fused = PagedKVCache(*heads_first, table, BLOCK_PAGES, kernel)
    q_b1nh = jnp.asarray(rng.normal(size=(len(LENGTHS), 1, K * G, H)), jnp.float32)
    positions_b1 = jnp.asarray(LENGTHS, jnp.int32)[:, None] - 1
    return reference, fused, q_b1nh, positions_b1


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
def test_the_kernel_equals_the_blockwise_loop_and_reads_no_page_past_a_rows_length(kernel):
    """Layer 1 (its pages sit past layer 0's in the kernel's `[K, L·P, page, H]` view), with NaN in every
    block of pages past each row's length and in every page of no row: a row's reads stop at its own
    length, not at the table's width or the batch's longest row."""
    reference, fused, q, positions = _caches(kernel, np.random.default_rng(0))
    table = np.asarray(fused.page_table)
    used = set()
    for b, length in enumerate(LENGTHS):
        used.update(table[b, : -(-length // (PAGE * BLOCK_PAGES)) * BLOCK_PAGES].tolist())
    unread = np.asarray([p for p in range(N_PAGES) if p not in used])
    poisoned = dataclasses.replace(
        fused, k=fused.k.at[:, 1, unread].set(jnp.nan), v=fused.v.at[:, 1, unread].set(jnp.nan)
    )
    got = jax.jit(poisoned.attend, static_argnums=0)(1, q, positions)
    np.testing.assert_allclose(got, reference.attend(1, q, positions), atol=TOLERANCE[kernel], rtol=TOLERANCE[kernel])


@pytest.mark.parametrize("kernel", ["triton", "mosaic"])
def test_a_write_to_the_kernels_pool_lands_where_the_blockwise_pool_puts_it(kernel):
    reference, fused, _, _ = _caches(kernel, np.random.default_rng(2))
    new = [jnp.asarray(np.random.default_rng(3).normal(size=(len(LENGTHS), 3, K, H)), jnp.float32) for _ in "kv"]
    start = jnp.asarray([30, 0, 95, 14], jnp.int32)  # across page boundaries
    want, got = reference.write(1, *new, start), fused.write(1, *new, start)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(got.k), 0, 3), want.k)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(got.v), 0, 3), want.v)


# ---- the rule, and the engine that runs it ------------------------------------------------------------


def _select(requested="auto", platform="tpu", dtype=jnp.bfloat16, head_dim=128, page=64, split="none"):
    return attention.select_paged(
        requested, platform=platform, dtype=dtype, head_dim=head_dim, page=page, block_pages=4, split=split
    )


def test_the_paged_decode_rule_picks_the_kernel_of_one_accelerator_and_the_loop_elsewhere():
    assert _select(platform="tpu") == "mosaic"
    assert _select(platform="gpu") == "triton"
    assert _select(platform="cpu") == "blockwise"  # the CPU keeps its measured loop
    assert _select(platform="gpu", dtype=jnp.float32) == "blockwise"  # Triton's f32 dots would be tf32
    assert _select(platform="gpu", head_dim=96) == "blockwise"  # Triton tiles are powers of two
    assert _select(platform="tpu", head_dim=64) == "blockwise"  # Mosaic lanes are 128 wide
    assert _select(platform="tpu", split="heads") == "mosaic"  # under shard_map, each device its own kv heads
    assert _select(platform="gpu", split="other") == "blockwise"  # pages split over devices: rows span them
    assert _select("blockwise", platform="gpu") == "blockwise"  # the override


@pytest.mark.parametrize("backend", ["dense", "cudnn", "splash"])
def test_a_backend_that_cannot_serve_paged_decode_is_rejected_naming_the_flag(backend):
    with pytest.raises(ValueError, match=f"--attention {backend}: the engine's paged KV cache"):
        _select(backend)


@pytest.mark.parametrize("backend, kernel", [("auto", "triton"), ("blockwise", "blockwise")])
def test_the_engine_decodes_with_the_attention_its_model_was_loaded_with(backend, kernel):
    model, _ = jobs.load_model(None, dtype="bfloat16", attention=backend)  # as batch and rejection load it
    with platform.lowering_for("gpu"):
        engine = Engine(model, slots=2, pages=8, page_size=16)
    assert engine.attention == kernel
    assert engine.k.shape == pool_shape(model.config, 8, 16, kernel)


@pytest.fixture(scope="module")
def model_16(tmp_path_factory):
    """A tiny checkpoint with 16-wide heads, the narrowest Triton tile."""
    directory = tmp_path_factory.mktemp("hf16")
    checkpoints.hf_checkpoint(directory, dim=128, n_heads=8, n_kv_heads=2)
    return llama_jax.load(directory, dtype="float32")


def test_an_engine_on_the_triton_kernel_writes_what_the_blockwise_engine_writes(model_16, monkeypatch):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 384, size=n).tolist() for n in (5, 27)]  # rows of different lengths, mid-page
    requests = [Request(i, p, SamplingParams(max_new_tokens=8)) for i, p in enumerate(prompts)]
    settings = dict(slots=2, pages=16, page_size=8, burst=4, prefill_chunk=32)
    want = Engine(model_16, **settings).generate(requests)
    monkeypatch.setattr(engine_module.attention, "select_paged", lambda *a, **k: "triton")
    fused = Engine(model_16, **settings)
    assert fused.attention == "triton"
    got = fused.generate(requests)
    assert [g.tokens for g in got] == [w.tokens for w in want]


def _mesh(fsdp: int, tensor: int):
    return jax.sharding.Mesh(np.asarray(jax.devices()[: fsdp * tensor]).reshape(fsdp, tensor), ("fsdp", "tensor"))


def test_a_pool_split_by_kv_heads_alone_runs_the_kernel_on_each_devices_heads(model_16):
    """The rule's "split": kv heads over the tensor axis, pages whole on every device ("heads": the kernel
    under shard_map); pages over the fsdp axis, or query heads split where the kv heads cannot be
    (2 kv heads on 4 devices: a device's query heads would meet the wrong kv heads), "other"."""
    from llama_jax.model import paged_attention
    from llama_jax.weights import placement

    config, pool = model_16.config, pool_shape(model_16.config, 16, 8, "triton")
    split = {
        mesh: paged_attention.pool_split(placement.sharding_spec(_mesh(*mesh), "fsdp_tp"), config, 4, pool)
        for mesh in ((1, 1), (1, 2), (2, 1), (1, 4))
    }
    assert split == {(1, 1): "none", (1, 2): "heads", (2, 1): "other", (1, 4): "other"}
    assert paged_attention.pool_split(None, config, 4, pool) == "none"


def test_an_engine_on_two_devices_runs_the_triton_kernel_per_kv_head_as_the_blockwise_engine(model_16, monkeypatch):
    """Sharded over 2 devices by kv heads, the engine decodes with the Triton kernel under shard_map, each
    device over its own kv head's pages, and writes what the one-device blockwise engine writes."""
    from llama_jax.weights import placement

    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 384, size=n).tolist() for n in (5, 27, 12)]
    requests = [Request(i, p, SamplingParams(max_new_tokens=8)) for i, p in enumerate(prompts)]
    settings = dict(slots=3, pages=24, page_size=8, burst=4, prefill_chunk=32)
    want = Engine(model_16, **settings).generate(requests)
    sharded = placement.shard_model(model_16, _mesh(1, 2), "fsdp_tp")
    asked = {}
    monkeypatch.setattr(engine_module.attention, "select_paged", lambda *a, **k: asked.update(k) or "triton")
    fused = Engine(sharded, **settings)  # float32 here: the rule itself would keep the loop (tf32 dots)
    assert asked["split"] == "heads" and fused.k.sharding.spec[0] == "tensor"
    got = fused.generate(requests)
    assert [g.tokens for g in got] == [w.tokens for w in want]


# ---- the contiguous cache's decode kernel (GPU) -----------------------------------------------------------

S_CONTIGUOUS = 2048  # 16 partitions of one 128-entry key block: a read past a row's length is a whole block


def test_the_contiguous_kernel_equals_the_dense_read_and_reads_no_block_past_a_rows_length():
    """A `[B, K, S, H]` layer with NaN in every key block past each row's length (GQA, rows ending mid-block,
    one entry, exactly one block): the kernel gives the dense read over the filled entries."""
    from llama_jax.model import paged_attention

    rng = np.random.default_rng(4)
    lengths = np.asarray([37, 1, 300, 128])
    b, block = len(lengths), paged_attention.DECODE_BLOCK_K
    assert paged_attention.contiguous_fits(S_CONTIGUOUS, H) and not paged_attention.contiguous_fits(S_CONTIGUOUS, 96)
    k_bksh, v_bksh = (rng.normal(size=(b, K, S_CONTIGUOUS, H)).astype(np.float32) for _ in range(2))
    q_bnh = jnp.asarray(rng.normal(size=(b, K * G, H)), jnp.float32)
    positions = jnp.asarray(lengths - 1)[:, None]
    want = attention.dense_kv_major(q_bnh[:, None], jnp.asarray(k_bksh), jnp.asarray(v_bksh), positions)
    for row, length in enumerate(lengths):
        read = -(-length // block) * block
        k_bksh[row, :, read:], v_bksh[row, :, read:] = np.nan, np.nan
    got = paged_attention.contiguous(q_bnh, jnp.asarray(k_bksh), jnp.asarray(v_bksh), jnp.asarray(lengths))
    np.testing.assert_allclose(got, want[:, 0], atol=1e-5, rtol=1e-5)


def test_the_contiguous_kernel_runs_on_a_layer_split_by_rows_and_kv_heads_alone(model_16):
    """Under shard_map: rows over one axis and kv heads over another, each device over its own rows' heads,
    or (kv_rep) the query heads split further with each device's one kv head copied; a layer whose query
    heads cannot follow its kv heads (2 kv heads on 4 tensor devices) is refused by the rule."""
    from llama_jax.model import paged_attention
    from llama_jax.sharding import rules as sharding_rules
    from llama_jax.weights import placement

    rng = np.random.default_rng(5)
    lengths = jnp.asarray([9, 700, 1, 2048])
    k_bksh, v_bksh = (jnp.asarray(rng.normal(size=(4, 2, S_CONTIGUOUS, 16)), jnp.float32) for _ in range(2))
    q_bnh = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
    want = paged_attention.contiguous(q_bnh, k_bksh, v_bksh, lengths)
    kv_rep = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("kv_rep", "tensor"))
    for mesh in (_mesh(1, 4), _mesh(2, 2), kv_rep):
        spec = placement.sharding_spec(mesh, "fsdp_tp")
        split = paged_attention.layer_split(spec.mesh, spec.rules, q_bnh.shape, k_bksh.shape)
        if mesh.shape.get("tensor") == 4:
            assert split is None
            continue
        if "kv_rep" in mesh.shape:  # each kv head copied on the 2 devices its query heads split over
            assert split[0][1] == ("tensor", "kv_rep") and split[1][1] == "tensor", split
        else:
            assert split[1][:2] == ("fsdp", "tensor"), split  # rows and kv heads split
        with sharding_rules.use_rules(spec.mesh, spec.rules):
            got = jax.jit(paged_attention.contiguous)(q_bnh, k_bksh, v_bksh, lengths)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("devices", [1, 2])
def test_generate_on_the_contiguous_kernel_writes_what_the_dense_read_writes(model_16, monkeypatch, devices):
    """`generate`'s decode steps on the Triton kernel (forced: the rule keeps float32 off it), one device and
    two (kv heads split), give the tokens and log-probs of the default decode."""
    from llama_jax.model import kv_cache
    from llama_jax.weights import placement

    prompts = [[1, 5, 9, 200, 7], [3] * 40, [11, 12]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, logprobs=True)
    want = llama_jax.generate(model_16, prompts, params)
    select = attention.select
    chosen = []

    def triton(requested, **kw):
        choice = "triton" if kw["q_len"] == 1 and kw.get("kernel_fits") else select(requested, **kw)
        chosen.append(choice)
        return choice

    monkeypatch.setattr(kv_cache.attention, "select", triton)
    jax.clear_caches()  # the programs traced for `want` would be reused: trace them again
    model = model_16 if devices == 1 else placement.shard_model(model_16, _mesh(1, 2), "fsdp_tp")
    got = llama_jax.generate(model, prompts, params)
    assert "triton" in chosen
    assert [g.tokens for g in got] == [w.tokens for w in want]
    np.testing.assert_allclose([g.logprobs for g in got], [w.logprobs for w in want], atol=1e-4)

"""The programs as the TPU and H100 compilers make them, on this CPU (llama_jax.planning.targets, .compiled).

First the reader is calibrated on programs whose answer is known: a transpose in a loop of known
trips moves twice its bytes per trip; a step loop of unknown trip count is one step. Then the real
programs are compiled at real widths (Llama 3.1 8B's dims with a few layers, an 8K cache; 405B's with
the FP8 release layout on 8 GPUs) and their optimized HLO is held to what a decode step must do: read
each weight and the cache in place (no cache- or weight-sized HBM copy, transpose or slice per step),
multiply FP8 weights as f8 x f8, run the fused attention selected, fit. A program that failed one of
these was a strict xfail carrying its measured number until fixed; none is left (full-depth numbers,
before and after: docs/TARGETS.md).
"""

from __future__ import annotations

import dataclasses
import os

import pytest

if os.environ.get("JAX_PLATFORMS", "cpu") != "cpu":
    pytest.skip("compiles for TPU/H100 with jax on the CPU (JAX_PLATFORMS=cpu)", allow_module_level=True)

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.model import quant
from llama_jax.model.config import model_config_from_file
from llama_jax.planning import compiled, target_programs, targets
from llama_jax.planning.target_programs import Setup

for _target in ("v5p-2", "h100x1"):
    try:
        targets.check_plugin(targets.get(_target))
    except targets.PluginMissing as e:
        pytest.skip(str(e), allow_module_level=True)

CONTEXT = 8192
MiB = 1 << 20
CONFIG_8B = dataclasses.replace(model_config_from_file("llama3_1_8b"), n_layers=2)
CONFIG_8B_FP8 = dataclasses.replace(CONFIG_8B, n_layers=3)  # the release quantizes layers 1..L-2
CONFIG_405B_FP8 = dataclasses.replace(model_config_from_file("llama3_1_405b"), n_layers=3)


def _replicated(target: targets.Target, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(target.mesh({"x": 1}), PartitionSpec()))


# ---- the reader, calibrated ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v5p-2", "h100x1"])
def test_a_transpose_in_a_loop_moves_its_bytes_twice_per_trip(name):
    target = targets.get(name)
    a = _replicated(target, (2048, 4096), jnp.bfloat16)
    nbytes = 2048 * 4096 * 2

    def program(trips):
        body = lambda i, a: jnp.swapaxes(jnp.swapaxes(a, 0, 1) * 1.001, 0, 1)[::-1]  # noqa: E731
        return jax.jit(lambda a: jax.lax.fori_loop(0, trips, body, a)).lower(a).compile()

    moved = {trips: compiled.read(program(trips), step_loop=False).moved for trips in (4, 8)}
    assert moved[8] - moved[4] == 4 * 2 * nbytes  # read + write, once per trip
    assert moved[4] >= 4 * 2 * nbytes


def test_a_step_loop_counts_its_body_once_and_nested_loops_by_their_trips():
    target = targets.get("h100x1")
    a = _replicated(target, (2048, 4096), jnp.bfloat16)
    n = _replicated(target, (), jnp.int32)

    def program(a, n):  # a loop of unknown trip count (a decode loop) around a fori_loop of 3
        inner = lambda j, a: jnp.swapaxes(jnp.swapaxes(a, 0, 1) * 1.001, 0, 1)[::-1]  # noqa: E731
        step = lambda c: (c[0] + 1, jax.lax.fori_loop(0, 3, inner, c[1]))  # noqa: E731
        return jax.lax.while_loop(lambda c: c[0] < n, step, (0, a))

    report = compiled.read(jax.jit(program).lower(a, n).compile())
    assert report.moved == 3 * 2 * 2048 * 4096 * 2 + sum(m.bytes for m in report.step_moves if m.bytes < MiB)
    assert any(not m.in_step for m in report.moves)  # the copy before the loop is per call, not per step


@pytest.mark.parametrize("name", ["v5e-4", "h100x8"])
def test_a_weight_gathered_from_its_shards_every_step_moves_the_whole_weight_twice(name):
    """An FSDP-split weight all-gathered inside the step (as an FSDP mesh decodes): the gathered array is
    written and read back, where reading each device's own shard would do. 256 MiB: too big for the TPU's
    VMEM, where a small gathered weight lands (`S(1)`, not counted)."""
    target = targets.get(name)
    mesh = target.mesh({"x": target.n_devices})
    d, f = 8192, 16384
    w = jax.ShapeDtypeStruct((d, f), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("x", None)))
    whole = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((8, d), jnp.bfloat16, sharding=whole)
    n = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)

    def program(w, x, n):  # w changes every step (as a layer scan's slice does): its gather cannot be hoisted
        def step(c):
            i, x, w = c
            return i + 1, jnp.tanh(x @ jax.lax.with_sharding_constraint(w, whole))[:, :d], w * 1.001

        return jax.lax.while_loop(lambda c: c[0] < n, step, (0, x, w))[1]

    report = compiled.read(jax.jit(program).lower(w, x, n).compile())
    gathers = [m for m in report.step_moves if m.kind.startswith("all-gather")]
    assert sum(m.bytes * m.times for m in gathers) == 2 * d * f * 2, report.step_moves


def test_two_shallow_compiles_predict_the_deep_program_copies_of_the_whole_stack_included():
    """`depth.extrapolate`: a program with a per-layer copy of the whole `[L, ...]` stack (L copies of L
    layers, as the TPU decode re-lays out its cache) read from its 3- and 5-layer compiles is its
    7-layer compile, bytes moved, memory and dots alike; a plain line through the totals is not."""
    from llama_jax.planning import depth

    target = targets.get("h100x1")

    def program(layers):
        def f(c, x):
            for i in range(layers):
                new = c.at[i].set(jnp.tanh(x[:1] @ c[i]))  # in place, while the old stack is still read:
                x = jnp.tanh(x @ new[i]) @ c[(i + 1) % layers]  # XLA copies the whole stack first
                c = new
            return c, x

        args = _replicated(target, (layers, 256, 256), jnp.float32), _replicated(target, (8, 256), jnp.float32)
        return compiled.read(jax.jit(f, donate_argnums=0).lower(*args).compile(), step_loop=False)

    reports = {d: program(d) for d in (3, 5, 7)}
    guess = depth.extrapolate(depth.reading(reports[3], 3, 7), depth.reading(reports[5], 5, 7))
    deep = depth.reading(reports[7], 7)
    assert guess.moves == deep.moves == {("copy", 2 * 7 * 256 * 256 * 4): 7}
    assert (guess.memory, guess.dots) == (deep.memory, deep.dots)
    assert 2 * reports[5].moved - reports[3].moved < deep.moved


def test_the_report_compiles_unrolled_gpu_decodes_shallow_and_the_rest_whole():
    from llama_jax.planning import program_report

    assert program_report.compiled_layers("8b", "bf16", "h100x1", "decode") == (3, 5)
    assert program_report.compiled_layers("8b", "bf16", "h100x1", "decode", full_depth=True) == (32,)
    assert program_report.compiled_layers("8b", "bf16", "h100x1", "prefill") == (32,)
    # libtpu's relayouts of a decode's cache depend on the whole program: TPU decodes compile whole.
    assert program_report.compiled_layers("8b", "bf16", "v5p-2", "decode") == (32,)
    # 405B's per-layer copy would not fit beside its weights on 8 H100s: it holds its layers unstacked,
    # and decodes them one by one all the same; on 16 v5p chips it scans its stack.
    assert program_report.compiled_layers("405b", "fp8", "h100x8", "burst") == (3, 5)
    assert program_report.compiled_layers("405b", "bf16", "v5p-16", "decode") == (126,)


def test_tracing_for_a_gpu_target_answers_the_cudnn_version_from_its_config_only_inside():
    """jax 0.10.2 asks the installed cuDNN library for its version before it builds cuDNN attention (no
    flag or variable skips it); tracing for a GPU target answers with the target config's version, and
    puts jax's own check back afterwards, after an error too."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    original, target = cudnn.check_cudnn_version, targets.get("h100x1")
    with targets.tracing(target):
        assert cudnn.check_cudnn_version() == target.cudnn_version() == 91000  # 9.10.0
    assert cudnn.check_cudnn_version is original
    with pytest.raises(KeyError), targets.tracing(target):
        raise KeyError("a failed trace")
    assert cudnn.check_cudnn_version is original
    with targets.tracing(targets.get("v5p-2")):
        assert cudnn.check_cudnn_version is original


def test_vmem_and_other_memory_spaces_are_not_hbm_traffic():
    assert compiled.array_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 8 * 128 * 2
    assert compiled.array_bytes("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}", hbm_only=True) == 0
    assert compiled.array_bytes("(f32[4]{0}, f8e4m3fn[16]{0})") == 16 + 16


def test_dot_operand_dtypes_are_resolved_through_the_fusion_parameters():
    text = """HloModule m

%gemm (p0: f8e4m3fn[64,128], p1: f8e4m3fn[128,256]) -> f32[64,256] {
  %p0 = f8e4m3fn[64,128]{1,0} parameter(0)
  %p1 = f8e4m3fn[128,256]{1,0} parameter(1)
  %c0 = f32[64,128]{1,0} convert(%p0)
  ROOT %dot.1 = f32[64,256]{1,0} dot(%c0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f8e4m3fn[64,128], b: f8e4m3fn[128,256]) -> f32[64,256] {
  %a = f8e4m3fn[64,128]{1,0} parameter(0)
  %b = f8e4m3fn[128,256]{1,0} parameter(1)
  ROOT %f = f32[64,256]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm
}
"""
    [dot] = compiled.read_text(text).dots
    assert (dot.lhs, dot.rhs, dot.upcast_from) == ("f32", "f8e4m3fn", "f8e4m3fn")


@pytest.mark.parametrize("name", ["v5p-2", "h100x1"])
def test_an_fp8_dot_compiles_to_f8_operands(name):
    target = targets.get(name)
    x = _replicated(target, (64, 4096), jnp.float8_e4m3fn)
    w = _replicated(target, (4096, 4096), jnp.float8_e4m3fn)
    dims = (((1,), (0,)), ((), ()))
    fn = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))
    report = compiled.read(fn.lower(x, w).compile())
    assert len(report.fp8_dots()) == 1 and not report.fp8_upcast_dots()


# ---- the real programs at real widths --------------------------------------------------------------


def _layer_kv(config, batch: int, setup: Setup) -> int:
    """Bytes of one layer's K cache, per device."""
    return batch * CONTEXT * config.n_kv_heads * config.head_dim * 2 // setup.mesh.size


def _big(config, batch: int, setup: Setup) -> int:
    """Bytes of the smallest thing a step must not copy: one layer's K cache or one layer weight, per device."""
    wk = config.dim * config.n_kv_heads * config.head_dim * 2 // setup.mesh.size
    return min(_layer_kv(config, batch, setup), wk)


@pytest.fixture(scope="module")
def decode():
    """{(target, batch): (setup, report)} of `generate`'s decode loop, 8B dims, 2 layers, 8K cache."""
    out = {}
    for name in ("v5p-2", "h100x1"):
        setup = Setup.create(CONFIG_8B, targets.get(name))
        for batch in (1, 8):
            out[name, batch] = setup, compiled.compile_and_read(setup.decode_loop(batch, CONTEXT))
    return out


def _copies_per_step(setup, report, batch):
    return [m for m in report.moves_at_least(_big(setup.config, batch, setup))]


@pytest.mark.parametrize("name, batch", [(n, b) for n in ("v5p-2", "h100x1") for b in (1, 8)])
def test_a_decode_step_copies_nothing_cache_or_weight_sized(decode, name, batch):
    """Measured on the cache laid out `[L, B, S, K, H]` before: on v5p at batch 8 the whole cache re-laid
    out twice per layer per step (efficiency 0.04 at full depth), on H100 each layer's K and V sliced
    out (batch 1: 0.88) or transposed (batch 8: 0.58) every step."""
    setup, report = decode[name, batch]
    assert _copies_per_step(setup, report, batch) == []
    assert report.memory["peak"] <= setup.target.hbm_bytes


@pytest.mark.parametrize("batch", [1, 8])
def test_a_gpu_decode_step_attends_with_the_split_k_kernel_that_reads_each_rows_filled_keys(decode, batch):
    """Length-aware on H100: the Triton decode kernel over each layer as it lies (the dense read it replaced
    read the whole 8K bucket whatever was filled; what the kernel reads past a row's length, nothing, is
    tested in interpret mode in tests/test_paged_attention.py)."""
    _, report = decode["h100x1", batch]
    assert report.attention_kernels().get(compiled.TRITON_KERNEL, 0) >= 1, report.custom_calls


def test_the_decode_loop_keeps_the_cache_in_one_layout_around_the_loop_too(decode):
    """No copy of the whole cache anywhere in the program, per step or once per call: a compiler that
    wants another layout inside the loop than the cache arrives in copies it in and out (v5p at batch 8
    did it twice per layer per step, the cache laid out `[L, B, S, K, H]`)."""
    for name in ("v5p-2", "h100x1"):
        setup, report = decode[name, 8]
        cache = CONFIG_8B.n_layers * _layer_kv(CONFIG_8B, 8, setup)  # all of K (or of V), per device
        assert [m for m in report.moves if m.bytes == 2 * cache] == [], name


def test_the_default_mesh_splits_weights_further_by_query_heads_for_inference_and_by_fsdp_for_training():
    """Past 8 devices (tensor parallel over Llama 3's 8 kv heads) inference splits the query heads, FFN and
    vocabulary further with the kv heads copied ("kv_rep"): an FSDP mesh gathers every layer's weights every
    decode step (405B bf16 on v5p-32: 0.39 of the roofline); training keeps FSDP. kv_rep stops where the
    query heads stop dividing; FSDP takes the rest."""
    v5p_32 = targets.get("v5p-32")
    assert v5p_32.default_mesh(128) == {"fsdp": 1, "kv_rep": 2, "tensor": 8}
    assert v5p_32.default_mesh(128, training=True) == {"fsdp": 2, "tensor": 8}
    assert targets.get("v5p-16").default_mesh(128) == {"fsdp": 1, "tensor": 8}
    pod = dataclasses.replace(v5p_32, n_devices=64)
    assert pod.default_mesh(32) == {"fsdp": 2, "kv_rep": 4, "tensor": 8}  # 8B's 32 query heads over 32 devices
    assert dict(Setup.create(CONFIG_8B, v5p_32).mesh.shape) == {"fsdp": 1, "kv_rep": 2, "tensor": 8}


def test_a_model_too_big_for_a_second_copy_of_its_layers_is_held_unstacked_on_gpus_and_scanned_on_tpus():
    """405B: on 8 H100s (FP8) or 8 H200s its layers are held one buffer per layer (`Unstacked`); on 16 v5p
    chips (bf16), where a scan reads the stack in place, they stay stacked and the decode scans them."""
    config = model_config_from_file("llama3_1_405b")
    assert Setup.create(config, targets.get("h100x8"), "fp8").by_layer
    assert Setup.create(config, targets.get("h200x8"), "fp8").by_layer
    tpu = Setup.create(config, targets.get("v5p-16"))
    assert not tpu.by_layer and tpu.scans_layers()
    assert not Setup.create(CONFIG_8B, targets.get("h100x1")).by_layer  # a copy fits: stacked, and copied


@pytest.mark.parametrize("name", ["v5p-2", "h100x1"])
def test_a_model_too_big_for_the_layer_copy_decodes_without_copying_a_cache_layer_or_a_weight(name):
    """The decode step of a model too big for per-layer copies (405B), 8B's widths. v5p: the layer scan
    indexes the stacked weights and cache by a traced layer and reads them in place all the same. H100:
    there the scan copies each layer's weights and K/V out of the stacks every step (docs/TARGETS.md), so
    the model holds its layers unstacked and runs them one by one, reading each in place."""
    by_layer = targets.get(name).platform == "cuda"
    setup = Setup.create(CONFIG_8B, targets.get(name), by_layer=by_layer)
    report = compiled.compile_and_read(setup.decode_loop(8, CONTEXT, stacked=not by_layer))
    assert report.moves_at_least(_big(CONFIG_8B, 8, setup)) == []


@pytest.mark.parametrize(
    "name, kernel", [("v5p-2", "tpu_custom_call"), ("v5p-8", "tpu_custom_call"), ("h100x1", "__cudnn$fmha")]
)
def test_prefill_runs_the_fused_attention_after_compiling(name, kernel):
    """v5p-8: 4 chips, the splash kernel under shard_map (unwrapped, the compiler refused to partition it)."""
    setup = Setup.create(dataclasses.replace(CONFIG_8B, n_layers=1), targets.get(name))
    report = compiled.compile_and_read(setup.prefill(1, 512, 1024), step_loop=False)  # one chunk
    assert any(k.startswith(kernel) for k in report.attention_kernels()), report.custom_calls


@pytest.mark.parametrize("name, kernel", [("v5p-2", compiled.TPU_KERNEL), ("h100x1", compiled.TRITON_KERNEL)])
def test_the_engine_burst_runs_the_paged_attention_kernel_and_copies_no_key_block(name, kernel):
    """One device: the engine decodes with the Pallas paged kernel, which reads the pages in place, so no
    gathered key block goes through HBM (the blockwise loop's copies: docs/TARGETS.md)."""
    setup = Setup.create(dataclasses.replace(CONFIG_8B, n_layers=1), targets.get(name))
    assert setup.paged_attention() in ("mosaic", "triton")
    report = compiled.compile_and_read(setup.burst(8, CONTEXT))
    assert report.attention_kernels().get(kernel, 0) >= 1, report.custom_calls
    keys = target_programs.PAGE_SIZE * target_programs.BLOCK_PAGES
    block = 8 * keys * CONFIG_8B.n_kv_heads * CONFIG_8B.head_dim * 2  # one layer's K block for 8 slots, bf16
    assert [m for m in report.step_moves if m.bytes >= block] == []  # nor a copy of the pool for the kernel


@pytest.fixture(scope="module")
def fp8_decode():
    """(fp8_matmul, batch) -> (setup, report) of the 8B FP8 decode loop on one H100, compiled on first use."""
    done = {}

    def get(mode: str, batch: int):
        if (mode, batch) not in done:
            setup = Setup.create(CONFIG_8B_FP8, targets.get("h100x1"), "fp8", fp8_matmul=mode)
            done[mode, batch] = setup, compiled.compile_and_read(setup.decode_loop(batch, CONTEXT))
        return done[mode, batch]

    return get


@pytest.mark.parametrize("batch", [1, 8])
def test_fp8_mode_dots_are_f8_by_f8_after_compiling(fp8_decode, batch):
    _, report = fp8_decode("fp8", batch)
    # One FP8 layer: w1 and w3 (which XLA may concatenate into one GEMM) and w2.
    assert len(report.fp8_dots()) >= 2 and not report.fp8_upcast_dots()


def _fp8_weight_moves(setup, moves) -> list:
    """Copies, transposes or slices of an FP8 weight among `moves`: FP8 arrays of a weight's size."""
    weight = setup.config.dim * setup.config.ffn_dim // setup.mesh.size  # one FP8 FFN weight shard, bytes
    return [m for m in moves if m.dtype.startswith("f8") and m.bytes // 2 >= weight]


@pytest.mark.parametrize("mode", ["fp8", "auto"])
@pytest.mark.parametrize("batch", [1, 8])
def test_the_gemms_read_the_fp8_weights_as_stored(fp8_decode, mode, batch):
    """Whichever way it multiplies, an FP8 layer's GEMMs take the FP8 weight itself as an operand (f8 x f8,
    or f8 converted inside the GEMM fusion: the weight-only read), and nothing transposes or copies it."""
    setup, report = fp8_decode(mode, batch)
    assert len(report.fp8_dots() + report.fp8_upcast_dots()) >= 2
    assert _fp8_weight_moves(setup, report.moves) == []


@pytest.mark.parametrize("batch", [1, 8])
def test_auto_decodes_the_way_the_compiled_programs_show_cheaper(fp8_decode, batch):
    """At decode's few rows `auto` runs the weight-only FP8 read with bf16 compute: its compiled step reads
    the FP8 weights inside its GEMM fusions as the FP8 GEMMs do, copies no more, holds no more
    temporaries, and quantizes no activations (docs/GPU.md)."""
    _, auto = fp8_decode("auto", batch)
    _, gemm = fp8_decode("fp8", batch)
    assert quant.matmul_mode("auto", batch) == "dequant"
    assert not auto.fp8_dots() and len(auto.fp8_upcast_dots()) >= 2 and len(gemm.fp8_dots()) >= 2
    assert auto.moved <= gemm.moved and auto.memory["temp"] <= gemm.memory["temp"]


@pytest.fixture(scope="module")
def decode_405b_fp8():
    # The layers held unstacked, as the full 405B is held there (its per-layer copy would not fit).
    setup = Setup.create(CONFIG_405B_FP8, targets.get("h100x8"), "fp8", by_layer=True)
    return setup, compiled.compile_and_read(setup.decode_loop(8, CONTEXT))


def test_405b_fp8_decode_transposes_no_weight_per_call(decode_405b_fp8):
    """The FP8 weights are stored as the FP8 GEMM reads them (output channel first), so the program does
    not transpose the stacked weights before its loop (the release layout did: 41.8 GB of temporaries
    per GPU at full depth, 107.6 GB > 80 GB)."""
    setup, report = decode_405b_fp8
    ffn_weight = setup.config.dim * setup.config.ffn_dim // setup.mesh.size  # one FP8 FFN weight shard
    assert [m for m in report.moves if not m.in_step and m.bytes // 2 >= ffn_weight] == []


def test_405b_fp8_decode_slices_no_weight_per_step(decode_405b_fp8):
    """Scanned from its stack, 405B FP8 on 8 H100s copied every layer's weights out of it every step (292 GB
    of copies per step at full depth besides the 65.3 GB read: efficiency 0.18); held unstacked it copies none."""
    setup, report = decode_405b_fp8
    wk = setup.config.dim * setup.config.n_kv_heads * setup.config.head_dim * 2 // setup.mesh.size
    assert report.moves_at_least(wk) == []  # the smallest weight: wk, wv (4 MiB per GPU)
    assert report.memory["temp"] <= 0.05 * setup.target.hbm_bytes


def test_405b_fp8_decode_multiplies_f8_by_f8(decode_405b_fp8):
    _, report = decode_405b_fp8
    assert len(report.fp8_dots()) >= 2 and not report.fp8_upcast_dots()


# ---- the planner, answered by the target's compiler -------------------------------------------------


def test_plan_with_a_target_is_compiled_by_that_target_and_sized_by_its_memory():
    import argparse

    from llama_jax.planning import plan

    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)  # in this process: a target's plan starts no virtual CPU devices
    p = plan.run(parser.parse_args(["--config", "tiny", "--batch", "8", "--context", "256", "--target", "v5p-8"]))
    assert p["compiler"].startswith("tpu (libtpu: TPU v5") and p["hardware"] == "v5p-8" and p["devices"] == 4
    assert p["device_memory"] == 95 * (1 << 30) and p["budget"] == int(0.9 * p["device_memory"])
    # The TPU compiler's buffers: weights and cache in (8, 128) tiles, padded beyond their logical bytes.
    assert p["decode"]["argument"] > p["weights_per_device"] + p["kv_cache_per_device"]
    assert p["temp_per_device"] == max(p["prefill"]["temp"], p["decode"]["temp"]) and p["fits"] is True


def test_plan_falls_back_to_the_cpu_estimate_and_says_so_without_the_plugin(monkeypatch):
    from llama_jax.planning import plan_target

    def missing(target):
        raise targets.PluginMissing(f"compiling for {target.name} needs the libtpu package")

    monkeypatch.setattr(targets, "check_plugin", missing)
    target, compiler = plan_target.compiler(targets.get("v5p-16"))
    assert target is None and compiler == "cpu (XLA:CPU estimate: compiling for v5p-16 needs the libtpu package)"


def test_plan_rejects_an_unknown_target_before_compiling():
    import argparse

    from llama_jax.planning import plan

    with pytest.raises(ValueError, match="--target: unknown target 'v9-8'; known: v5e-1, v5e-4"):
        plan._mesh_sizes(argparse.Namespace(target="v9-8", preset=None, mesh=None), n_heads=32)


def test_a_program_libtpu_refuses_for_memory_is_a_no_with_the_bytes_it_needs():
    from llama_jax.planning import plan_target

    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(108.80G) exceeds available HBM (95.74G)."
    )
    phase = plan_target.refused(f"jax.errors.JaxRuntimeError: {message}\nmore", 2.5)
    assert phase["peak"] == int(108.80 * (1 << 30)) and phase["refused"].endswith(message)


def test_a_training_step_compiles_for_8_h100s_with_its_state_updated_in_place():
    """`Trainer`'s step, built on abstract weights (no float32 master copy exists), compiled for 8 H100s:
    the master params and AdamW state are donated, so the step's outputs alias its inputs."""
    setup = Setup.create(CONFIG_8B, targets.get("h100x8"))
    report = compiled.compile_and_read(setup.train_step(8, 1024), step_loop=False)
    state = 3 * 4 * CONFIG_8B.num_params() // setup.mesh.size  # float32 master, Adam's two moments, sharded
    assert state <= report.memory["alias"] <= 1.05 * state
    assert report.memory["peak"] <= setup.target.hbm_bytes


def test_every_named_target_has_its_devices_and_memory_and_says_what_is_missing(monkeypatch):
    expected = {"v5e-8": (8, "TPU v5 lite", 16), "v5p-32": (16, "TPU v5", 95), "v6e-4": (4, "TPU v6 lite", 32)}
    expected |= {"h100x8": (8, "NVIDIA H100 80GB HBM3", 84942979072 / (1 << 30)), "h200x8": (8, "NVIDIA H200", 141)}
    for name, (n, kind, gib) in expected.items():
        target = targets.get(name)
        devices = target.devices()
        assert len(devices) == target.n_devices == n and devices[0].device_kind.startswith(kind)
        assert target.hbm_bytes == round(gib * (1 << 30))
    monkeypatch.setattr(targets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(targets.PluginMissing, match="v5p-2 needs the libtpu package"):
        targets.check_plugin(targets.get("v5p-2"))
    with pytest.raises(targets.PluginMissing, match="jax-cuda12-plugin and jax-cuda12-pjrt"):
        targets.check_plugin(targets.get("h100x1"))

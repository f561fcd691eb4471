"""Sharding on 8 fake CPU devices: meshes, rules, and a sharded model that computes what one device does.

Every mesh here has the same logits as the unsharded model (fp32, max|diff| / max|ref| <= 1e-5),
through a full forward, a prefill + decode over a sharded KV cache, and greedy generation; the
loader hands each device only its own slice; host memory while loading stays far below the
checkpoint's size.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

import llama_jax
from llama_jax.model.kv_cache import CACHE_AXES
from llama_jax.model.model import abstract
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import ops
from llama_jax.sharding import rules as sharding_rules
from llama_jax.weights import layout, loading, placement
from tests import checkpoints

TOLERANCE = 1e-5
ROOT = pathlib.Path(__file__).resolve().parents[1]
# 8 query heads, 2 KV heads: every tensor axis above 2 has more devices than KV heads.
MODEL = dict(vocab_size=384, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=160)
TOKENS = np.random.RandomState(0).randint(0, 384, size=(8, 24))


def relative_error(got, ref) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tiny")
    checkpoints.hf_checkpoint(path, **MODEL)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The unsharded model's logits: full forward, prefill of 16 tokens (the last one's), then 4 decode steps."""
    model = llama_jax.load(checkpoint, dtype="float32")
    return model(TOKENS), _cached_logits(model, None)


def _cached_logits(model, spec):
    cache = placement.zeros_cache(model.config, TOKENS.shape[0], 32, spec, dtype=jnp.float32)
    prefill = nnx.jit(lambda m, t, c: m.prefill(t, c))
    decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c), donate_argnums=3)
    logits, cache = prefill(model, TOKENS[:, :16], cache)  # [B, V]: the last prompt token's
    out = [np.asarray(logits)[:, None]]
    for pos in range(16, 20):
        logits, cache = decode(model, TOKENS[:, pos : pos + 1], np.full((8, 1), pos, np.int32), cache)
        out.append(np.asarray(logits))
    if spec is not None:  # the cache stayed where it belongs through prefill and decode
        assert cache.k.sharding.is_equivalent_to(placement.cache_sharding(model.config, 8, 32, spec), 5)
    return np.concatenate(out, axis=1)


# ---- meshes -------------------------------------------------------------------------------------


def test_mesh_axes_parse_and_fill_in():
    assert mesh_lib.parse_axes("data=2,tensor=4") == {"data": 2, "fsdp": 1, "kv_rep": 1, "tensor": 4}
    assert mesh_lib.resolve_axes("fsdp=-1,tensor=4", 8) == {"data": 1, "fsdp": 2, "kv_rep": 1, "tensor": 4}
    for bad in ("data=2,model=4", "data", "data=0", "data=-1,tensor=-1", "tensor=2,tensor=4"):
        with pytest.raises(ValueError):
            mesh_lib.parse_axes(bad)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_lib.resolve_axes("data=2,tensor=3", 8)


def test_mesh_is_auto_typed_with_tensor_innermost():
    mesh = mesh_lib.make_mesh("data=2,tensor=4")
    assert mesh.axis_names == ("data", "fsdp", "kv_rep", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "kv_rep": 1, "tensor": 4}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    # The tensor axis runs over neighbouring devices (one node / ICI neighbours): ids 0-3, 4-7.
    assert mesh_lib.device_grid(mesh).reshape(2, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_presets_name_their_hardware():
    gib = 1 << 30
    h100x8, h100x16 = mesh_lib.preset("h100x8"), mesh_lib.preset("h100x16")
    assert (h100x8.n_devices, h100x8.hosts, h100x8.memory_bytes) == (8, 1, 80 * gib)
    assert (h100x16.n_devices, h100x16.hosts, dict(h100x16.mesh)) == (16, 2, {"tensor": 8, "kv_rep": 2})
    v5p = mesh_lib.preset("v5p-128")  # 128 TensorCores = 64 chips, 16 hosts
    assert (v5p.n_devices, v5p.hosts, v5p.memory_bytes) == (64, 16, 95 * gib)
    v6e = mesh_lib.preset("v6e-256")
    assert (v6e.n_devices, v6e.memory_bytes) == (256, 32 * gib)
    for hw in mesh_lib.PRESETS.values():
        assert np.prod(list(hw.mesh.values())) == hw.n_devices, hw.name
    with pytest.raises(ValueError, match="unknown hardware preset"):
        mesh_lib.preset("a100x8")


# ---- rules --------------------------------------------------------------------------------------


def test_parameter_axes_are_read_from_the_model():
    """Which logical axes a parameter carries is the model's own metadata; rules are checked against all of them."""
    model = abstract(llama_jax.LlamaConfig(**MODEL))
    axes = placement.parameter_axes(model)
    assert axes["layers.attention.wq"] == ("layers", "embed", "q_heads", "head_dim")
    assert axes["output"] == ("embed", "vocab") and axes["norm"] == ("norm",)
    for path, v in nnx.to_flat_state(nnx.state(model)):
        assert len(axes[".".join(path).removesuffix(".weight")]) == v.ndim, path
    every = placement.array_axes()
    assert set(axes) < set(every) and every["kv_cache"] == CACHE_AXES
    # an FP8 model's per-channel scales and the unquantized layers' FFNs are checked too
    assert every["layers.feed_forward.w2_scale"] == ("layers", "embed") and "dense_ffn.w1" in every
    assert {name for names in every.values() for name in names} <= set(sharding_rules.LOGICAL_AXES)


def test_every_strategy_is_named_and_valid():
    assert set(sharding_rules.STRATEGIES) == {"dp", "fsdp", "tp", "fsdp_tp"}
    assert sharding_rules.get_rules("fsdp_tp") == sharding_rules.DEFAULT_RULES
    for rules in sharding_rules.STRATEGIES.values():
        assert sharding_rules.validate(rules, arrays=placement.array_axes()) == tuple(rules)
        assert {name for name, _ in rules} == set(sharding_rules.LOGICAL_AXES)


@pytest.mark.parametrize(
    "rules, message",
    [
        ((("embed", "tensor"), ("mlp", "tensor")), "collision.*'mlp' and 'embed'"),
        ((("kv_heads", "data"), ("batch", "data")), "collision in kv_cache"),
        ((("q_heads", ("tensor", "kv_rep")), ("head_dim", "kv_rep")), "collision"),
        ((("embed", "fsdp"), ("embed", "tensor")), "listed twice"),
        ((("heads", "tensor"),), "unknown logical axis 'heads'"),
        ((("mlp", ("tensor", "tensor")),), "mesh axis twice"),
        ((("mlp",),), "expected"),
    ],
)
def test_rules_reject_collisions_and_mistakes(rules, message):
    with pytest.raises(ValueError, match=message):
        placement.llama_rules(rules)


def test_axes_that_do_not_divide_are_replicated():
    mesh = mesh_lib.make_mesh("tensor=8")
    rules = sharding_rules.DEFAULT_RULES
    # 8 KV heads on tensor=8 split; 2 KV heads on tensor=8 are replicated, not unevenly split.
    assert sharding_rules.logical_to_spec(CACHE_AXES, rules, mesh=mesh, shape=(2, 8, 8, 32, 16)) == PartitionSpec(
        None, None, "tensor", None, None
    )
    assert sharding_rules.logical_to_spec(CACHE_AXES, rules, mesh=mesh, shape=(2, 8, 2, 32, 16)) == PartitionSpec(
        None, None, None, None, None
    )
    # With a kv_rep axis the 2 KV heads split over tensor=2 and only kv_rep replicates them.
    mesh = mesh_lib.make_mesh("kv_rep=4,tensor=2")
    assert sharding_rules.logical_to_spec(CACHE_AXES, rules, mesh=mesh, shape=(2, 8, 2, 32, 16))[2] == "tensor"
    wq_axes = placement.array_axes()["layers.attention.wq"]
    wq = sharding_rules.logical_to_spec(wq_axes, rules, mesh=mesh, shape=(2, 64, 8, 8))
    assert wq == PartitionSpec(None, None, ("tensor", "kv_rep"), None)


# ---- a sharded model computes what one device computes -----------------------------------------

PARITY = [
    "tensor=8",  # 2 KV heads on 8 devices: KV weights and cache replicated
    "kv_rep=4,tensor=2",  # ... the same 8 devices with the KV heads split in 2
    "fsdp=2,tensor=4",
    "data=8",
]


@pytest.mark.parametrize("axes", PARITY)
def test_sharded_logits_equal_unsharded(checkpoint, reference, axes):
    """The default strategy (fsdp x tensor): full forward, and prefill + decode over a sharded cache."""
    mesh = mesh_lib.make_mesh(axes)
    model = llama_jax.load(checkpoint, dtype="float32", mesh=mesh)
    wq = model.layers.attention.wq[...]
    wq_axes = placement.logical_axes(model.layers.attention.wq)
    assert wq.sharding.is_equivalent_to(model.sharding.sharding(wq_axes, wq.shape), wq.ndim)
    full, cached = reference
    assert relative_error(nnx.jit(lambda m, t: m(t))(model, TOKENS), full) <= TOLERANCE
    assert relative_error(_cached_logits(model, model.sharding), cached) <= TOLERANCE


@pytest.mark.parametrize(
    "axes, strategy, w1_shard",
    [
        ("data=2,fsdp=2,tensor=2", "dp", (2, 64, 160)),
        ("fsdp=8", "fsdp", (2, 8, 160)),
        ("data=2,tensor=4", "tp", (2, 64, 40)),
    ],
)
def test_every_strategy_computes_the_same_logits(checkpoint, reference, axes, strategy, w1_shard):
    """An in-memory model moved onto a mesh (`shard_model`) under each named strategy."""
    model = placement.shard_model(llama_jax.load(checkpoint, dtype="float32"), mesh_lib.make_mesh(axes), strategy)
    assert model.layers.feed_forward.w1[...].addressable_shards[0].data.shape == w1_shard
    assert relative_error(nnx.jit(lambda m, t: m(t))(model, TOKENS), reference[0]) <= TOLERANCE


def _collectives(hlo: str) -> list[tuple[str, str, bool]]:
    """(op, result type, inside the layer loop) of every collective in a compiled program."""
    found = []
    for line in hlo.splitlines():
        m = re.search(
            r"=\s*(\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(", line
        )
        if m:
            found.append((m.group(2), m.group(1), "while/body" in line))
    return found


def _decode_hlo(model) -> str:
    cache = placement.zeros_cache(model.config, 8, 32, model.sharding, dtype=jnp.float32)
    decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c), donate_argnums=3)
    return decode.lower(model, TOKENS[:, :1], np.full((8, 1), 5, np.int32), cache).compile().as_text()


def test_decode_never_gathers_the_kv_cache_when_kv_heads_are_fewer_than_devices(checkpoint):
    """2 KV heads on tensor=8: the cache is replicated, and must stay so. Unpinned, the GQA attention
    re-splits it by head and all-gathers the whole [L, B, S, K, H] cache back, every step."""
    model = llama_jax.load(checkpoint, dtype="float32", mesh=mesh_lib.make_mesh("tensor=8"))
    cache_type = f"f32[2,8,32,2,{model.config.head_dim}]"
    assert [c for c in _collectives(_decode_hlo(model)) if cache_type in c[1]] == []


def test_with_kv_rep_attention_needs_no_collectives(checkpoint):
    """tensor x kv_rep: each device's query heads read KV heads it holds. Inside the layer loop the
    only collectives are the two activation all-reduces of tensor parallelism (after wo and w2)."""
    model = llama_jax.load(checkpoint, dtype="float32", mesh=mesh_lib.make_mesh("kv_rep=4,tensor=2"))
    in_loop = [(op, t) for op, t, loop in _collectives(_decode_hlo(model)) if loop]
    assert [op for op, _ in in_loop] == ["all-reduce", "all-reduce"], in_loop
    assert all(t == "f32[8,1,64]{2,1,0}" for _, t in in_loop), in_loop


def test_greedy_generation_is_the_same_on_a_mesh(checkpoint):
    from llama_jax.inference.sampler import generate

    prompts = [list(TOKENS[i, : 5 + 2 * i]) for i in range(4)]
    ref = generate(llama_jax.load(checkpoint, dtype="float32"), prompts, max_new_tokens=12, temperature=0.0)
    mesh = mesh_lib.make_mesh("fsdp=2,kv_rep=2,tensor=2")
    got = generate(llama_jax.load(checkpoint, dtype="float32", mesh=mesh), prompts, max_new_tokens=12, temperature=0.0)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    assert all(len(r.tokens) > 0 for r in ref)


# ---- explicit collectives (shard_map) -----------------------------------------------------------


@pytest.mark.parametrize("axes", ["data=2,tensor=4", "kv_rep=2,tensor=4"])
def test_vocab_parallel_top_k_is_exact_and_gathers_k_not_v(axes):
    mesh = mesh_lib.make_mesh(axes)
    spec = placement.sharding_spec(mesh, "fsdp_tp")
    logits = np.random.RandomState(1).randn(16, 4096).astype(np.float32)
    placed = jax.device_put(logits, spec.sharding(("batch", "vocab"), logits.shape))
    top = jax.jit(lambda x: ops.top_k(x, 40, spec=spec))
    values, indices = top(placed)
    ref_values, ref_indices = jax.lax.top_k(logits, 40)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_array_equal(values, ref_values)
    # The compiler's own top_k on the same sharded logits gathers all 4096 per row; ours 40 x 4.
    mine = _collectives(top.lower(placed).compile().as_text())
    theirs = _collectives(jax.jit(lambda x: jax.lax.top_k(x, 40)).lower(placed).compile().as_text())
    assert mine and all("4096" not in t for _, t, _ in mine), mine
    assert any("4096" in t for _, t, _ in theirs), theirs


def test_top_k_off_mesh_is_lax_top_k():
    x = np.random.RandomState(2).randn(3, 50).astype(np.float32)
    for got, ref in zip(ops.top_k(x, 5), jax.lax.top_k(x, 5), strict=True):
        np.testing.assert_array_equal(got, ref)


# ---- loading: each device reads its slice; the host never holds the checkpoint -----------------


class _Recorded(np.ndarray):
    """A view of a memory-mapped tensor that records how many elements each read takes."""

    reads: list = []

    def __array_finalize__(self, obj):
        self.source = getattr(obj, "source", None)

    def __getitem__(self, index):
        out = super().__getitem__(index)
        if isinstance(out, np.ndarray) and out.ndim == self.ndim:
            _Recorded.reads.append((self.source, out.size))
        return out


def test_each_device_reads_only_its_slice(checkpoint, reference):
    ckpt = loading.open_checkpoint(checkpoint)
    read = ckpt.read

    def recording_read(name):
        view = read(name).view(_Recorded)
        view.source = name
        return view

    ckpt.read = recording_read
    _Recorded.reads = []
    mesh = mesh_lib.make_mesh("fsdp=2,tensor=4")
    model = loading.load_from(ckpt, dtype="float32", mesh=mesh)
    config = ckpt.config
    spec = model.sharding
    expected = {}  # source tensor -> elements in one device's slice of it
    axes = placement.parameter_axes(model)
    for rule in layout.rules_for(config):
        names = axes[".".join(rule.path).removesuffix(".weight")]
        shape = tuple(dict(nnx.to_flat_state(nnx.state(model)))[rule.path].get_value().shape)
        if rule.per_layer:
            names, shape = names[1:], shape[1:]
        shard = spec.sharding(names, shape).shard_shape(shape)
        for source in layout.source_names(rule, config, "hf"):
            expected[source] = int(np.prod(shard))
    assert {s for s, _ in _Recorded.reads} == set(expected)
    wrong = [(s, n, expected[s]) for s, n in _Recorded.reads if n != expected[s]]
    assert wrong == []
    # the big tensors really are split 8 ways (fsdp x tensor), not read whole by every device
    embed = "model.embed_tokens.weight"
    assert expected[embed] * 8 == MODEL["vocab_size"] * MODEL["dim"]
    assert relative_error(model(TOKENS), reference[0]) <= TOLERANCE


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from llama_jax import load  # its modules imported before the baseline, as jax is
    from llama_jax.sharding import mesh as mesh_lib

    def status():
        fields = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    mesh = mesh_lib.make_mesh("fsdp=2,tensor=4")
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # start the backend before the baseline
    base = status()
    peak = {"anon": 0}
    running = True

    def sample():
        while running:
            peak["anon"] = max(peak["anon"], status()["RssAnon"])
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    model = load(sys.argv[1], dtype="bfloat16", mesh=mesh)
    jax.block_until_ready(jax.tree.leaves(model))
    seconds = time.perf_counter() - start
    running = False
    thread.join()
    end = status()
    device_bytes = sum(s.data.nbytes for x in jax.tree.leaves(model) for s in x.addressable_shards)
    print(json.dumps(dict(baseline_anon=base["RssAnon"], peak_anon=max(peak["anon"], end["RssAnon"]),
                          vm_hwm=end["VmHWM"], baseline_hwm=base["VmHWM"], rss_file=end["RssFile"],
                          device_bytes=device_bytes, seconds=seconds)))
    """
)


class _Filled:
    """A lazily materialised float32 tensor (written one at a time by `write_safetensors`)."""

    def __init__(self, shape, value):
        self.shape, self.dtype, self.value = shape, np.dtype(np.float32), value

    def __array__(self, dtype=None, copy=None):
        return np.full(self.shape, self.value, np.float32)


def test_sharded_load_keeps_host_memory_far_below_the_checkpoint(tmp_path):
    """A 540 MB float32 checkpoint loaded as bf16 onto 8 devices (fsdp=2 x tensor=4).

    On fake CPU devices the device buffers live in host memory too, so the bf16 model itself
    (half the checkpoint) is part of the figure; what the loader may add is small staging only.
    A loader that read the checkpoint into memory first would need >= 1.5x the checkpoint.
    """
    from llama_jax.weights.safetensors_io import write_safetensors

    config = llama_jax.LlamaConfig(vocab_size=32768, dim=1024, n_layers=6, n_heads=16, n_kv_heads=4, ffn_dim=3072)
    d, f, h = config.dim, config.ffn_dim, config.head_dim
    tensors = [
        ("model.embed_tokens.weight", _Filled((config.vocab_size, d), 0.01)),
        ("lm_head.weight", _Filled((config.vocab_size, d), 0.02)),
        ("model.norm.weight", _Filled((d,), 1.0)),
    ]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", _Filled((config.n_heads * h, d), 0.01)),
            (p + "self_attn.k_proj.weight", _Filled((config.n_kv_heads * h, d), 0.01)),
            (p + "self_attn.v_proj.weight", _Filled((config.n_kv_heads * h, d), 0.01)),
            (p + "self_attn.o_proj.weight", _Filled((d, config.n_heads * h), 0.01)),
            (p + "mlp.gate_proj.weight", _Filled((f, d), 0.01)),
            (p + "mlp.up_proj.weight", _Filled((f, d), 0.01)),
            (p + "mlp.down_proj.weight", _Filled((d, f), 0.01)),
            (p + "input_layernorm.weight", _Filled((d,), 1.0)),
            (p + "post_attention_layernorm.weight", _Filled((d,), 1.0)),
        ]
    checkpoint_bytes = write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    assert checkpoint_bytes == config.num_params() * 4 > 500e6

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = m["peak_anon"] - m["baseline_anon"]
    staging = grown - m["device_bytes"]
    print(
        f"\ncheckpoint {checkpoint_bytes / 2**20:.0f} MiB (fp32); on devices {m['device_bytes'] / 2**20:.0f} MiB "
        f"(bf16); peak anonymous RSS growth {grown / 2**20:.0f} MiB, of which staging {staging / 2**20:.0f} MiB; "
        f"VmHWM {m['baseline_hwm'] / 2**20:.0f} -> {m['vm_hwm'] / 2**20:.0f} MiB (incl. mapped checkpoint pages, "
        f"{m['rss_file'] / 2**20:.0f} MiB file-backed at the end); "
        f"load {m['seconds']:.1f}s"
    )
    assert abs(m["device_bytes"] - checkpoint_bytes // 2) < 2**20  # bf16; only the norms are replicated
    assert grown < 0.75 * checkpoint_bytes
    assert staging < 0.25 * checkpoint_bytes
    # Mapped checkpoint pages are released tensor by tensor: at most about one tensor is resident.
    largest = config.vocab_size * config.dim * 4
    assert m["vm_hwm"] - m["baseline_hwm"] < grown + largest + 32 * 2**20

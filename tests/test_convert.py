"""`convert`: HF ⇄ Orbax ⇄ Meta, bit-exact, atomic, streaming; transformers reads what we write."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import llama_jax
from llama_jax.jobs.convert import convert, meta_params
from llama_jax.weights import layout
from llama_jax.weights.hf import HFCheckpoint
from llama_jax.weights.safetensors_io import write_safetensors
from tests.checkpoints import META_PARAMS, hf_checkpoint, meta_state_dict, write_meta_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENS = jnp.asarray([[1, 17, 300, 5, 99, 250, 7, 64, 3, 128]])


def hf_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    ckpt = HFCheckpoint(path)
    return {name: np.asarray(ckpt.read(name)) for name in ckpt.names()}


def assert_same_bits(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and got[name].shape == w.shape, name
        assert got[name].tobytes() == w.tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("hf_bf16")
    hf_checkpoint(path, dtype=torch.bfloat16, n_layers=3)
    return path


def test_hf_to_orbax_to_hf_is_bit_exact_and_sharded(hf_bf16, tmp_path):
    orbax_dir = convert(hf_bf16, tmp_path / "orbax", to="orbax", progress=False)
    back = convert(orbax_dir, tmp_path / "hf", to="hf", max_shard_size="40KB", progress=False)

    assert_same_bits(hf_tensors(back), hf_tensors(hf_bf16))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in hf_tensors(back).values())
    assert HFCheckpoint(back).config == HFCheckpoint(hf_bf16).config
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not list(tmp_path.glob(".*tmp*")), "temporary directories left behind"


def test_meta_to_hf_is_bit_exact_after_the_qk_row_permutation(tmp_path):
    state = meta_state_dict(META_PARAMS)
    write_meta_checkpoint(tmp_path / "meta", META_PARAMS, state, mp=2)
    out = convert(tmp_path / "meta", tmp_path / "hf", to="hf", progress=False)

    config = llama_jax.LlamaConfig.from_meta_params(META_PARAMS)
    want = {}
    for rule in layout.rules_for(config):
        for meta_name, hf_name in zip(
            layout.source_names(rule, config, "meta"), layout.source_names(rule, config, "hf"), strict=True
        ):
            w = state[meta_name].bfloat16().view(torch.int16).numpy()
            if rule.rotary_heads is not None:  # HF rows are rotate-half ordered (transformers' `permute`)
                w = layout.meta_to_hf_rows(w, rule.rotary_heads(config))
            want[hf_name] = w
    got = {n: a.view(np.int16) for n, a in hf_tensors(out).items()}
    assert_same_bits(got, want)


def test_orbax_restores_onto_a_mesh_and_meta_export_loads(hf_bf16, tmp_path):
    orbax_dir = convert(hf_bf16, tmp_path / "orbax", to="orbax", progress=False)
    meta_dir = convert(orbax_dir, tmp_path / "meta", to="meta", progress=False)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))

    sharded = llama_jax.load(orbax_dir, dtype="float32", mesh=mesh)
    reference = llama_jax.load(hf_bf16, dtype="float32")
    from_meta = llama_jax.load(meta_dir, dtype="float32")

    w1 = sharded.layers.feed_forward.w1[...]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in w1.addressable_shards} == {(3, 32, 40)}  # each device holds only its slice
    for got, want in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(reference)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # sharded matmuls reduce in another order: equal up to float32 rounding
    np.testing.assert_allclose(np.asarray(sharded(TOKENS)), np.asarray(reference(TOKENS)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(from_meta(TOKENS)), np.asarray(reference(TOKENS)))
    assert json.loads((meta_dir / "params.json").read_text()) == meta_params(reference.config)


def test_transformers_loads_our_export_and_its_logits_match_ours(tmp_path):
    from transformers import LlamaForCausalLM

    hf_checkpoint(tmp_path / "src", dtype=torch.float32, tie=False)
    ours_dir = convert(tmp_path / "src", tmp_path / "orbax", to="orbax", progress=False)
    exported = convert(ours_dir, tmp_path / "hf", to="hf", dtype="float32", progress=False)

    theirs = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert theirs.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        want = theirs(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    got = np.asarray(llama_jax.load(ours_dir, dtype="float32")(TOKENS))
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


# ---- bad inputs: clear errors, nothing `load` would accept ---------------------------------------------


def _no_output(tmp_path: pathlib.Path, name: str = "out") -> None:
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}.tmp-*"))


def test_truncated_file_is_reported(hf_bf16, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in hf_bf16.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        convert(src, tmp_path / "out", progress=False)
    _no_output(tmp_path)


def test_missing_shard_named_in_the_index_is_reported(tmp_path):
    hf_checkpoint(tmp_path / "src", max_shard_size="60KB")
    shards = sorted((tmp_path / "src").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        convert(tmp_path / "src", tmp_path / "out", progress=False)
    _no_output(tmp_path)


def test_shape_and_dtype_that_disagree_with_the_config_are_reported(hf_bf16, tmp_path):
    tensors = hf_tensors(hf_bf16)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    tensors["model.norm.weight"] = np.arange(64, dtype=np.int32)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((hf_bf16 / "config.json").read_text())
    write_safetensors(src / "model.safetensors", sorted(tensors.items()))
    with pytest.raises(ValueError) as e:
        convert(src, tmp_path / "out", progress=False)
    assert "'model.layers.1.mlp.up_proj.weight'" in str(e.value) and "expected [160, 64]" in str(e.value)
    assert "'model.norm.weight'" in str(e.value) and "int32" in str(e.value)
    _no_output(tmp_path)


def test_existing_non_empty_destination_is_refused_unless_overwrite(hf_bf16, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(hf_bf16, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(hf_bf16, tmp_path / "out", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert_same_bits(hf_tensors(tmp_path / "out"), hf_tensors(hf_bf16))


def test_the_main_cli_converts_to_orbax_and_load_reads_it(hf_bf16, tmp_path):
    """`python -m llama_jax convert SRC DST --to orbax`, end to end, then the same logits."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_jax",
            "convert",
            str(hf_bf16),
            str(tmp_path / "orbax"),
            "--to",
            "orbax",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert run.returncode == 0, run.stderr
    tokens = np.arange(10)[None, :]
    np.testing.assert_array_equal(
        np.asarray(llama_jax.load(tmp_path / "orbax")(tokens)), np.asarray(llama_jax.load(hf_bf16)(tokens))
    )


def test_cli_reports_errors_without_a_traceback(hf_bf16, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    run = subprocess.run(
        [sys.executable, "-m", "llama_jax.jobs.convert", str(hf_bf16), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert run.returncode == 2 and "not empty" in run.stderr and "Traceback" not in run.stderr


# ---- a big synthetic model: killed and rerun; peak memory -----------------------------------------------


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def _synthetic_hf(path: pathlib.Path, *, n_layers: int, dim: int, ffn: int, vocab: int) -> tuple[int, int]:
    """A bf16 HF checkpoint written tensor by tensor (no torch model); → (largest tensor, total) bytes."""
    config = llama_jax.LlamaConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=8, n_kv_heads=8, ffn_dim=ffn)
    path.mkdir()
    rng = np.random.default_rng(0)

    class Random:  # small finite bf16 values, made only when written
        def __init__(self, shape):
            self.shape, self.dtype = shape, np.dtype(jnp.bfloat16)

        def __array__(self, dtype=None, copy=None):
            bits = rng.integers(0, 1 << 16, size=self.shape, dtype=np.uint16) & np.uint16(0xBCFF)
            return bits.view(jnp.bfloat16)

    entries = [
        (name, Random(rule.source_shape(config)))
        for rule in layout.rules_for(config)
        for name in layout.source_names(rule, config, "hf")
    ]
    write_safetensors(path / "model.safetensors", entries)
    (path / "config.json").write_text(json.dumps(config.to_hf_config()))
    sizes = [int(np.prod(e.shape)) * 2 for _, e in entries]
    return max(sizes), sum(sizes)


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "hf"
    largest, total = _synthetic_hf(path, n_layers=12, dim=1024, ffn=4096, vocab=8192)
    return path, largest, total


_MEASURE = """
import resource, sys
import llama_jax.jobs.convert, numpy, jax, tqdm, ml_dtypes  # every import before the baseline
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
base = hwm()
llama_jax.jobs.convert.convert(sys.argv[1], sys.argv[2], to="hf", max_shard_size="100MB", progress=False)
print(base, hwm())
"""


def test_peak_memory_while_converting_stays_near_the_largest_tensor(big_hf, tmp_path):
    src, largest, total = big_hf
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(src), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    )
    base, peak = map(int, run.stdout.split()[-2:])
    growth = peak - base
    print(
        f"\nconvert {total / 2**20:.0f} MB model, largest tensor {largest / 2**20:.0f} MB: "
        f"peak RSS grew {growth / 2**20:.0f} MB over the {base / 2**20:.0f} MB baseline"
    )
    assert total > 8 * largest
    assert growth < 3 * largest
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) >= 4


def test_conversion_killed_midway_leaves_nothing_loadable_and_a_rerun_completes(big_hf, tmp_path):
    src, _, _ = big_hf
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "llama_jax.jobs.convert",
        str(src),
        str(out),
        "--max-shard-size",
        "50MB",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".out.tmp-*/model-*.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "conversion ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    (stale,) = tmp_path.glob(".out.tmp-*")
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        llama_jax.open_checkpoint(stale)

    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True)
    assert not list(tmp_path.glob(".out.tmp-*")), "the stale temporary was not cleaned"
    got, want = HFCheckpoint(out), HFCheckpoint(src)
    assert got.names() == want.names()
    for name in ["model.embed_tokens.weight", "model.layers.11.mlp.down_proj.weight", "lm_head.weight"]:
        assert got.read(name).tobytes() == want.read(name).tobytes()

"""Every weight source is one `Checkpoint`, filled into a model by one placement loop; outputs are atomic."""

import hashlib

import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.jobs.convert import convert
from llama_jax.model.config import LlamaConfig
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.weights import atomic, fp8, loading
from llama_jax.weights.checkpoint import Checkpoint
from llama_jax.weights.default_model import DefaultCheckpoint, default_model
from llama_jax.weights.orbax import OrbaxCheckpoint
from tests import checkpoints

TINY = LlamaConfig(
    vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, rope_theta=10000.0, max_seq_len=64
)


def _params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_the_default_model_is_a_checkpoint_placed_like_any_other():
    """The embedded default goes through `load_from`: on one device it is `default_model`, and on a mesh
    every parameter lands sharded by the rules with the same values."""
    assert isinstance(DefaultCheckpoint(seed=0), Checkpoint)
    digest = hashlib.sha256()
    for path, value in sorted(_params(default_model(warn=False)).items()):
        digest.update(str(path).encode() + value.tobytes())
    # the weights `default_model` drew before it became a checkpoint (numpy's generator, sorted paths)
    assert digest.hexdigest() == "1d2386db5e7b7414acffe49b28e6e1dcbfd3ce0fd4f263534d8b7c1bc5a48425"

    tiny = DefaultCheckpoint(seed=1, config=TINY)
    one = loading.load_from(tiny, dtype="float32")
    sharded = loading.load_from(tiny, dtype="float32", mesh=mesh_lib.make_mesh("fsdp=2,tensor=4"))
    placed = _params(sharded)
    for path, value in _params(one).items():
        np.testing.assert_array_equal(placed[path], value)
    wq = sharded.layers.attention.wq[...]
    assert wq.sharding.shard_shape(wq.shape) != wq.shape  # split over the devices, not replicated
    norms = [v for k, v in _params(one).items() if k[-1] == "weight"]
    assert norms and all((v == 1).all() for v in norms)


def test_orbax_is_opened_and_loaded_like_hf(tmp_path):
    hf = tmp_path / "hf"
    checkpoints.hf_checkpoint(hf)
    orbax_dir = convert(hf, tmp_path / "orbax", to="orbax", progress=False)
    ckpt = llama_jax.open_checkpoint(orbax_dir)
    assert isinstance(ckpt, OrbaxCheckpoint) and ckpt.config == llama_jax.open_checkpoint(hf).config
    restored = _params(llama_jax.load(orbax_dir, dtype="float32"))
    for path, value in _params(llama_jax.load(hf, dtype="float32")).items():
        np.testing.assert_array_equal(restored[path], value)


def test_the_release_quantizes_every_ffn_but_the_first_and_last():
    assert fp8.release_layers(126) == tuple(range(1, 125))
    assert fp8.PATHS == {("layers", "feed_forward", w) for w in ("w1", "w3", "w2")}


def test_a_replaced_file_is_old_or_new_never_a_part(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic.write_atomically(path, [b"a\n", b"b\n"])
    with pytest.raises(RuntimeError), atomic.replacing(path) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"a\nb\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    atomic.write_atomically(path, "c\n")
    assert path.read_bytes() == b"c\n"


def test_a_directory_appears_only_complete(tmp_path):
    dst = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic.directory(dst) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic.directory(dst) as tmp:
        (tmp / "a").write_text("1")
    with atomic.directory(dst) as tmp:  # replaces the old directory whole
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dst.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

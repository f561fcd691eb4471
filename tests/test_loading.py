"""`load` recognises checkpoints by itself and rejects broken ones with errors that say what is wrong."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.weights.hf import HFCheckpoint
from llama_jax.weights.meta import MetaCheckpoint
from tests import checkpoints


@pytest.fixture(scope="module")
def hf_sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_sharded")
    checkpoints.hf_checkpoint(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="module")
def meta_mp2(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta_mp2")
    params = checkpoints.META_PARAMS
    checkpoints.write_meta_checkpoint(path, params, checkpoints.meta_state_dict(params), mp=2)
    return path


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_recognises_hf_and_meta_layouts(hf_sharded, meta_mp2, tmp_path):
    assert isinstance(llama_jax.open_checkpoint(hf_sharded), HFCheckpoint)
    assert isinstance(llama_jax.open_checkpoint(meta_mp2), MetaCheckpoint)
    # HF repos also ship Meta's files under original/
    (tmp_path / "repo").mkdir()
    shutil.copytree(meta_mp2, tmp_path / "repo" / "original")
    assert isinstance(llama_jax.open_checkpoint(tmp_path / "repo"), MetaCheckpoint)


def test_meta_and_hf_layouts_of_the_same_weights_give_the_same_model(tmp_path):
    """Meta's interleaved rotary rows are permuted into HF's layout on load."""
    params = checkpoints.META_PARAMS
    state = checkpoints.meta_state_dict(params)
    checkpoints.write_meta_checkpoint(tmp_path / "mp1", params, state, mp=1)
    checkpoints.write_meta_checkpoint(tmp_path / "mp2", params, state, mp=2)
    tokens = np.arange(12)[None, :]
    one = np.asarray(llama_jax.load(tmp_path / "mp1", dtype="float32")(tokens))
    two = np.asarray(llama_jax.load(tmp_path / "mp2", dtype="float32")(tokens))
    np.testing.assert_array_equal(one, two)


def test_missing_shard_named_in_index(hf_sharded, tmp_path):
    path = copy(hf_sharded, tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        llama_jax.load(path)


def test_truncated_safetensors_file(hf_sharded, tmp_path):
    path = copy(hf_sharded, tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=f"{victim.name}.*truncated"):
        llama_jax.load(path)


def test_tensor_shape_disagreeing_with_config(hf_sharded, tmp_path):
    path = copy(hf_sharded, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 192
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        llama_jax.load(path)
    message = str(info.value)
    # every mismatch is listed at once, each naming the tensor, its shape and the expected one
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "model.layers.1.mlp.down_proj.weight" in message
    assert "[160, 64], expected [192, 64]" in message


def test_missing_tensor(tmp_path):
    checkpoints.hf_checkpoint(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.self_attn\.q_proj\.weight'"):
        llama_jax.load(tmp_path / "ckpt")


@pytest.mark.parametrize("content", [[], ["notes.txt"], ["pytorch_model.bin", "config.json"]])
def test_unknown_layout(tmp_path, content):
    for name in content:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        llama_jax.load(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        llama_jax.load(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="pass the directory"):
        llama_jax.load(tmp_path / "model.safetensors")


def test_meta_gap_in_shard_numbering(meta_mp2, tmp_path):
    path = copy(meta_mp2, tmp_path)
    (path / "consolidated.01.pth").rename(path / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth"):
        llama_jax.load(path)


def test_meta_last_shard_missing_shows_as_shape_mismatch(meta_mp2, tmp_path):
    path = copy(meta_mp2, tmp_path)
    (path / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match=r"'layers\.0\.attention\.wq\.weight'.*shape \[32, 64\], expected \[64, 64\]"):
        llama_jax.load(path)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('!')",))


def test_meta_pth_is_loaded_with_weights_only(meta_mp2, tmp_path, monkeypatch):
    """A .pth whose pickle runs code is refused, and the code never runs."""
    monkeypatch.chdir(tmp_path)
    path = copy(meta_mp2, tmp_path)
    torch.save(
        {"tok_embeddings.weight": torch.zeros(2), "x": _Exploit()}, path / "consolidated.00.pth", pickle_module=pickle
    )
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: cannot read"):
        llama_jax.load(path)
    assert not (tmp_path / "PWNED").exists()


def test_meta_mp8_onto_8_devices_holds_about_one_slice_on_the_host(tmp_path):
    """Each device reads only its slice from the rank holding it: the host's peak (numpy buffers,
    traced in a fresh process) stays near one device slice, never one merged tensor
    (benchmarks/meta_load_memory.py; before, merging every tensor peaked at 2x the largest one)."""
    from benchmarks import meta_load_memory as bench
    from llama_jax.model.config import LlamaConfig

    params = bench.PARAMS
    checkpoints.write_meta_checkpoint(tmp_path, params, checkpoints.meta_state_dict(params), mp=bench.MP)
    c = LlamaConfig.from_meta_params(params)
    largest = c.vocab_size * c.dim * 2  # the embedding, bfloat16
    result = bench.measure(tmp_path, "slices")
    assert result["embedding_slice_shape"] == [c.vocab_size // 8, c.dim]
    assert result["peak_host_bytes"] <= 1.5 * largest / bench.MP  # measured 0.68 of one slice


def test_the_embedded_model_on_a_mesh_is_the_default_model_sharded():
    """`jobs.load_model(None, mesh=...)` places the embedded `DefaultCheckpoint` through `loading.load`, as
    a checkpoint is placed: the same weights, shardings and options as the default model moved onto it."""
    import jax
    from flax import nnx

    from llama_jax.jobs import jobs
    from llama_jax.sharding.mesh import make_mesh
    from llama_jax.weights import default_model
    from llama_jax.weights.placement import shard_model

    model, _ = jobs.load_model(None, mesh="fsdp=2,tensor=4")
    moved = shard_model(default_model.default_model(warn=False), make_mesh("fsdp=2,tensor=4"), "fsdp_tp")
    assert model.options == moved.options and model.dtype == moved.dtype
    for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(moved)), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

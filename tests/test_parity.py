"""Our logits equal the reference implementations' logits (fp32: max|diff| / max|ref| <= 1e-4)."""

import numpy as np
import pytest
import torch

import llama_jax
from tests import checkpoints

TOLERANCE = 1e-4


def relative_error(got, ref) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def hf_logits(model, tokens, positions=None):
    with torch.no_grad():
        kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
        return model(torch.tensor(tokens), **kwargs).logits.float().numpy()


TOKENS = np.random.RandomState(0).randint(0, 384, size=(2, 24))


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, tie",
    [(8, 8, False), (8, 2, False), (8, 1, False), (8, 2, True), (4, 1, True)],
    ids=["mha", "gqa", "mqa", "gqa-tied", "mqa-tied"],
)
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "index"])
def test_logits_match_transformers(tmp_path, n_heads, n_kv_heads, tie, sharded):
    ref_model = checkpoints.hf_checkpoint(
        tmp_path, n_heads=n_heads, n_kv_heads=n_kv_heads, tie=tie, max_shard_size="60KB" if sharded else None
    )
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model = llama_jax.load(tmp_path, dtype="float32")
    assert model.config.tie_embeddings == tie
    assert relative_error(model(TOKENS), hf_logits(ref_model, TOKENS)) <= TOLERANCE


@pytest.mark.parametrize("stride", [500, 2_000, 5_000])
def test_logits_match_transformers_at_positions_past_8192(tmp_path, stride):
    """Where the llama3 frequency scaling matters: positions (and distances) far beyond 8192.

    RoPE only sees relative distances, so the positions are spread out, up to ~120K apart.
    """
    ref_model = checkpoints.hf_checkpoint(tmp_path)
    model = llama_jax.load(tmp_path, dtype="float32")
    positions = 9_000 + stride * np.arange(TOKENS.shape[1])[None, :] + np.array([[0], [777]])
    ref = hf_logits(ref_model, TOKENS, positions)
    assert relative_error(model(TOKENS, positions), ref) <= TOLERANCE
    # ... and the positions really change the answer.
    assert relative_error(model(TOKENS), ref) > 100 * TOLERANCE


@pytest.mark.parametrize("mp", [1, 2])
def test_logits_match_meta_reference(tmp_path, mp):
    """Meta's `llama_models.llama3.model.Transformer` on a bf16 `consolidated.*.pth` checkpoint."""
    params = checkpoints.META_PARAMS
    state = checkpoints.meta_state_dict(params)
    checkpoints.write_meta_checkpoint(tmp_path, params, state, mp=mp)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == mp

    model = llama_jax.load(tmp_path, dtype="float32")
    reference = checkpoints.meta_reference_model(params, state)
    ref = reference(torch.tensor(TOKENS), 0).float().numpy()
    assert relative_error(model(TOKENS), ref) <= TOLERANCE


# Measured on this suite's models: bf16 weights and activations stay within 2% of the fp32
# logits (max|diff| / max|ref| = 0.63% here); the bound leaves room, not slack for a bug.
BF16_BOUND = 0.03


def test_bfloat16_load_stays_close_to_float32(tmp_path):
    ref_model = checkpoints.hf_checkpoint(tmp_path, dtype=torch.bfloat16)
    model = llama_jax.load(tmp_path)  # bfloat16 by default
    assert model.tok_embeddings[...].dtype == np.dtype("bfloat16")
    ref32 = hf_logits(ref_model.float(), TOKENS)
    error = relative_error(model(TOKENS), ref32)
    assert error <= BF16_BOUND
    # greedy choices mostly agree with fp32
    agree = (np.asarray(model(TOKENS)).argmax(-1) == ref32.argmax(-1)).mean()
    assert agree >= 0.9

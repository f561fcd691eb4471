"""Rotary frequencies equal Meta's and HF's bit for bit; angles agree at 128K positions."""

import numpy as np
import pytest
import torch

from llama_jax import RopeScaling
from llama_jax.model.rope import inverse_frequencies, sin_cos


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_llama3_frequencies_equal_metas_apply_scaling_bitwise(head_dim):
    from llama_models.llama3.model import apply_scaling

    base = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    np.testing.assert_array_equal(inverse_frequencies(head_dim, 500000.0, RopeScaling()), apply_scaling(base).numpy())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_frequencies_equal_transformers_bitwise(head_dim, factor):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    config = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_array_equal(inverse_frequencies(head_dim, 500000.0, RopeScaling(factor=factor)), expected.numpy())


def test_unscaled_frequencies_equal_llama2s():
    expected = 1.0 / (10000.0 ** (torch.arange(0, 128, 2).float() / 128))
    np.testing.assert_array_equal(inverse_frequencies(128, 10000.0, None), expected.numpy())


def test_scaling_keeps_high_divides_low_and_smooths_between():
    plain = inverse_frequencies(128, 500000.0, None)
    scaled = inverse_frequencies(128, 500000.0, RopeScaling())
    wavelen = 2 * np.pi / plain
    np.testing.assert_array_equal(scaled[wavelen < 2048], plain[wavelen < 2048])
    np.testing.assert_allclose(scaled[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-7)
    middle = (wavelen >= 2048) & (wavelen <= 8192)
    assert middle.sum() == 6 and np.all(scaled[middle] < plain[middle]) and np.all(scaled[middle] > plain[middle] / 8)


def test_angles_match_metas_freqs_cis_up_to_128k():
    from llama_models.llama3.model import precompute_freqs_cis

    positions = np.array([[0, 1, 8191, 8192, 65_535, 131_071]])
    freqs_cis = precompute_freqs_cis(128, 131_072, 500000.0, use_scaled=True)[positions[0]]
    sin, cos = sin_cos(positions, inverse_frequencies(128, 500000.0, RopeScaling()))
    np.testing.assert_allclose(np.asarray(cos[0]), freqs_cis.real.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin[0]), freqs_cis.imag.numpy(), atol=2e-6)

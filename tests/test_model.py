"""How a model is built: options fixed at construction, one abstract-model builder, and weights that
multiply as they are stored (plain, FP8 with its scale, LoRA-adapted, fused) so the math never branches."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.inference import decoding
from llama_jax.model import quant
from llama_jax.model.config import LlamaConfig
from llama_jax.model.linear import Adapter, Separate, Weight
from llama_jax.model.model import Llama, LoraSpec, abstract
from llama_jax.model.options import Options
from llama_jax.weights import lora

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)


def test_options_are_fixed_at_construction_and_another_setting_is_another_model():
    model = Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.options.attention_block = 8
    with pytest.raises(AttributeError):
        model.sharding = None
    other = model.with_options(attention_block=8, attention_backend="dense")
    assert (model.options.attention_block, other.options.attention_block) == (Options().attention_block, 8)
    assert other.layers.attention.wq.get_value() is model.layers.attention.wq.get_value()  # shared, not copied
    np.testing.assert_allclose(other(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)


def test_options_travel_with_the_graphdef_through_split_merge_and_lora():
    model = Llama(CONFIG, dtype=jnp.float32, rngs=nnx.Rngs(0), options=Options(attention_block=16, prefill_chunk=4))
    graphdef, state = nnx.split(model)
    assert nnx.merge(graphdef, state).options == model.options
    adapted = lora.add_adapters(model, LoraSpec(rank=2))
    assert adapted.options == dataclasses.replace(model.options, lora=LoraSpec(rank=2))
    assert lora.merge(adapted).options == model.options


def test_bad_options_are_refused_before_any_weight_is_made():
    with pytest.raises(ValueError, match="attention must be one of"):
        Options(attention_backend="flash")
    with pytest.raises(ValueError, match="LoRA on FP8 feed-forward"):
        Options(fp8=quant.Fp8Spec((1,)), lora=LoraSpec(targets=("w1",)))


def test_every_abstract_model_is_built_by_model_abstract():
    """No module outside model.py builds a Llama under `eval_shape` itself: one builder, all options."""
    offenders = []
    for path in [*(ROOT / "llama_jax").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        if path.name != "model.py" and re.search(r"eval_shape\(\s*lambda[^)]*:\s*Llama\(", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_abstract_model_has_the_loaded_models_parameters_and_options():
    options = Options(fp8=quant.Fp8Spec((1,)), score_labels=1, attention_backend="dense")
    model = abstract(CONFIG, jnp.bfloat16, options)
    assert model.options == options and model.output is None and model.score.shape == (32, 1)
    assert model.layers.feed_forward.w1.dtype == quant.FP8 and model.dense_ffn.w1.shape == (1, 32, 48)


def _weights(rng, fp8: bool, adapters: bool):
    """w1, w3 as `Weight`s: FP8 [F, D] with scales, or float32 [D, F] with LoRA adapters."""
    out = []
    for _ in range(2):
        w = jnp.asarray(rng.normal(0, 0.2, (32, 48)), jnp.float32)
        if fp8:
            q, scale = quant.quantize_rows(w.T)  # rows = output channels: the FP8 layout
            out.append(Weight(q, scale, fp8=quant.Fp8Spec((0,))))
        else:
            a = jnp.asarray(rng.normal(0, 0.5, (32, 2)), jnp.float32) if adapters else None
            b = jnp.asarray(rng.normal(0, 0.5, (2, 48)), jnp.float32) if adapters else None
            out.append(Weight(w, adapter=Adapter(a, b, 2.0) if adapters else None))
    return Separate(tuple(out))


@pytest.mark.parametrize("fp8, adapters", [(False, False), (False, True), (True, False)], ids=["plain", "lora", "fp8"])
def test_a_fused_weight_computes_what_its_separate_parts_compute(fp8, adapters):
    rng = np.random.default_rng(1)
    separate = _weights(rng, fp8, adapters)
    x = jnp.asarray(rng.normal(0, 1, (2, 3, 32)), jnp.float32)
    fused = separate.fused()
    assert fused.weight.w.shape == ((96, 32) if fp8 else (32, 96)) and (fused.weight.scale is not None) == fp8
    for got, want in zip(fused("btd,df->btf", x), separate("btd,df->btf", x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if fp8:  # the FP8 weight multiplies as `quant.fp8_linear` does, from its own scale
        part = separate.parts[0]
        np.testing.assert_array_equal(part("btd,df->btf", x), quant.fp8_linear(x, part.w, part.scale))


def test_the_decode_copy_runs_an_fp8_models_dense_layers_from_dense_ffn():
    """Layer 0 and 2 of an FP8 model hold zeros in their FP8 slots; the decode copy takes their FFN from
    `dense_ffn`, so per-layer decoding equals the stacked scan (which picks it per layer)."""
    config = CONFIG.replace(n_layers=3)
    model = Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(0), options=Options(fp8=quant.Fp8Spec((1,))))
    layers = decoding.layer_weights(model, fuse=False)
    assert layers[0].feed_forward.w2.scale is None and layers[1].feed_forward.w2.scale is not None
    np.testing.assert_array_equal(layers[2].feed_forward.w2.w, model.dense_ffn.w2.get_value()[1])
    positions = jnp.broadcast_to(jnp.arange(6), TOKENS.shape)
    scanned, _ = model.forward(TOKENS, positions)
    per_layer, _ = jax.jit(lambda m, ls: m.forward(TOKENS, positions, layers=ls))(model, layers)
    np.testing.assert_allclose(per_layer, scanned, rtol=1e-5, atol=1e-6)

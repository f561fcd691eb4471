"""FP8 405B release format (HF fbgemm_fp8): rowwise quantization, loading with FFNs kept in FP8, accuracy."""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

import llama_jax
from llama_jax.jobs.convert import convert, fp8_quantization_config
from llama_jax.model import quant
from tests.checkpoints import hf_checkpoint

N_LAYERS = 4
FFN = ("gate_proj", "up_proj", "down_proj")


def release_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the FP8 release stores: scale = amax/448 per output row, weight = fp8(w / scale)."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, pathlib.Path]:
    """bf16 source; its FP8 release-format twin (FFN of layers 1..L-2); the FP8 model dequantized to bf16."""
    root = tmp_path_factory.mktemp("fp8")
    hf_checkpoint(
        root / "bf16",
        dtype=torch.bfloat16,
        n_layers=N_LAYERS,
        dim=128,
        ffn_dim=384,
        vocab_size=512,
        n_heads=4,
        n_kv_heads=2,
    )
    tensors = load_file(root / "bf16" / "model.safetensors")
    fp8, dequantized = dict(tensors), dict(tensors)
    for i in range(1, N_LAYERS - 1):
        for proj in FFN:
            name = f"model.layers.{i}.mlp.{proj}.weight"
            q, scale = release_quantize(tensors[name])
            fp8[name], fp8[name + "_scale"] = q, scale
            dequantized[name] = (q.float() * scale).bfloat16()
    hf_config = json.loads((root / "bf16" / "config.json").read_text())
    for kind, weights in (("fp8", fp8), ("dequantized", dequantized)):
        (root / kind).mkdir()
        save_file(weights, root / kind / "model.safetensors", metadata={"format": "pt"})
        config = dict(hf_config)
        if kind == "fp8":
            config["quantization_config"] = {
                "quant_method": "fbgemm_fp8",
                "activation_scale_ub": 1200.0,
                "modules_to_not_convert": fp8_quantization_config(llama_jax.open_checkpoint(root / "bf16").config)[
                    "modules_to_not_convert"
                ],
            }
        (root / kind / "config.json").write_text(json.dumps(config))
    return {"root": root, "bf16": root / "bf16", "fp8": root / "fp8", "dequantized": root / "dequantized"}


def test_rowwise_quantization_is_fbgemms_and_saturates():
    w = torch.randn(96, 80) * torch.logspace(-3, 1, 96)[:, None]
    q_ref, s_ref = release_quantize(w)
    q, s = quant.quantize_rowwise_np(w.numpy())
    assert s.dtype == np.float32 and s.shape == (96, 1)
    np.testing.assert_array_equal(s, s_ref.numpy())
    assert q.tobytes() == q_ref.view(torch.uint8).numpy().tobytes()

    # activations: the scale is capped at ub/448, so large entries must clip to ±448, never NaN
    x = jnp.asarray([[5000.0, -3000.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    xq, x_scale = quant.quantize_rows(x, quant.ACTIVATION_SCALE_UB)
    np.testing.assert_allclose(np.asarray(x_scale), [1200.0 / 448, 1 / (448 * 512)], rtol=1e-6)
    assert np.asarray(xq.astype(jnp.float32)).tolist()[0][:2] == [448.0, -448.0]
    assert not np.isnan(np.asarray(xq.astype(jnp.float32))).any()
    # the jitted quantizer (activations at run time) agrees up to one ulp of the scale: XLA turns the
    # division by 448 into a multiplication; weights are quantized with the numpy one, bit-exact
    jq, js = quant.quantize_rows(jnp.asarray(w.numpy()))
    np.testing.assert_allclose(np.asarray(js), s[:, 0], rtol=2e-7)
    assert np.mean(np.asarray(jq).view(np.uint8) == q.view(np.uint8)) > 0.99


def test_fp8_matmul_modes_agree_with_the_dequantized_product():
    key_w, key_x = jax.random.split(jax.random.key(0))
    w = jax.random.normal(key_w, (64, 48))  # our layout [in, out]
    q, s = quant.quantize_rows(w.T)  # rows = output channels: the FP8 weight layout [out, in]
    x = jax.random.normal(key_x, (2, 3, 64)).astype(jnp.bfloat16)
    exact = np.asarray(x.astype(jnp.float32) @ (q.T.astype(jnp.float32) * s[None, :]))
    for mode, tol in (("dequant", 0.02), ("fp8", 0.08)):
        got = np.asarray(quant.fp8_linear(x, q, s, mode=mode).astype(jnp.float32))
        assert np.max(np.abs(got - exact)) <= tol * np.max(np.abs(exact)), mode


def test_auto_multiplies_decode_rows_weight_only_and_prefill_rows_as_fp8_gemms():
    w = jax.random.normal(jax.random.key(0), (48, 64))  # [out, in], the FP8 layout
    q, s = quant.quantize_rows(w)
    x = jax.random.normal(jax.random.key(1), (quant.FP8_GEMM_MIN_ROWS, 1, 64)).astype(jnp.bfloat16)
    small, large = x[:8], x
    assert quant.matmul_mode("auto", 8) == "dequant" and quant.matmul_mode("auto", large.shape[0]) == "fp8"
    np.testing.assert_array_equal(quant.fp8_linear(small, q, s, mode="auto"), quant.fp8_linear(small, q, s))
    np.testing.assert_array_equal(quant.fp8_linear(large, q, s, mode="auto"), quant.fp8_linear(large, q, s, mode="fp8"))
    # One row is padded for the GPU compiler's FP8 GEMM; the padding does not change it.
    np.testing.assert_array_equal(quant.fp8_linear(x[:1], q, s, mode="fp8"), quant.fp8_linear(x, q, s, mode="fp8")[:1])


def test_fp8_checkpoint_loads_with_ffn_weights_kept_in_fp8(checkpoints):
    model = llama_jax.load(checkpoints["fp8"])
    ff = model.layers.feed_forward
    # in the FP8 GEMM's layout, output channel first (the release's [out, in])
    assert ff.w1[...].dtype == jnp.float8_e4m3fn and ff.w1[...].shape == (N_LAYERS, 384, 128)
    assert ff.w2_scale[...].dtype == jnp.float32 and ff.w2_scale[...].shape == (N_LAYERS, 128)
    assert model.fp8.quantized_layers == (1, 2)
    # layers 0 and L-1 were not quantized by the release: they stay bf16, exactly as stored
    assert model.dense_ffn.w1[...].dtype == jnp.bfloat16 and model.dense_ffn.w1[...].shape == (2, 128, 384)
    bf16 = llama_jax.load(checkpoints["bf16"])
    np.testing.assert_array_equal(
        np.asarray(model.dense_ffn.w3[...][1]), np.asarray(bf16.layers.feed_forward.w3[...][3])
    )

    tokens = jnp.asarray([[1, 50, 300, 7, 9, 411, 2, 33]])
    reference = llama_jax.load(checkpoints["dequantized"])
    got, want = np.asarray(model(tokens)), np.asarray(reference(tokens))
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want))  # within bf16 rounding


def test_convert_quantize_fp8_writes_the_release_layout(checkpoints, tmp_path):
    out = convert(checkpoints["bf16"], tmp_path / "fp8", quantize="fp8", progress=False)
    got, want = load_file(out / "model.safetensors"), load_file(checkpoints["fp8"] / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    config = json.loads((out / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((checkpoints["fp8"] / "config.json").read_text())["quantization_config"]
    )
    assert "model.layers.0.mlp.down_proj" in config["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.1.mlp.down_proj" not in config["quantization_config"]["modules_to_not_convert"]


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Plain greedy argmax over full forward passes of a fixed-length buffer (causal: padding is inert)."""
    length = len(prompt) + steps
    forward = nnx.jit(lambda m, t: jnp.argmax(m(t)[0], axis=-1))
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(prompt)] = prompt
    for t in range(len(prompt), length):
        buffer[0, t] = int(forward(model, jnp.asarray(buffer))[t - 1])
    return buffer[0, len(prompt) :].tolist()


def test_fp8_accuracy_against_bf16(checkpoints, record_property):
    bf16 = llama_jax.load(checkpoints["bf16"])
    prompt, steps = [1, 50, 300, 7], 252
    reference = _greedy(bf16, prompt, steps)
    sequence = jnp.asarray([prompt + reference])
    want = np.asarray(bf16(sequence))
    report = {}
    for mode in ("dequant", "fp8"):
        model = llama_jax.load(checkpoints["fp8"], fp8_matmul=mode)
        got = np.asarray(model(sequence))
        generated = _greedy(model, prompt, steps)
        same_prefix = next((i for i, (a, b) in enumerate(zip(generated, reference, strict=True)) if a != b), steps)
        report[mode] = {
            "max_logit_error": float(np.max(np.abs(got - want))),
            "max_logit": float(np.max(np.abs(want))),
            "teacher_forced_argmax_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
            "greedy_identical_prefix": same_prefix,
            "greedy_agreement": float(np.mean(np.asarray(generated) == np.asarray(reference))),
        }
    print("\nFP8 vs bf16 over", steps, "greedy tokens:", json.dumps(report, indent=1))
    record_property("fp8_vs_bf16", report)
    for mode, r in report.items():
        assert r["max_logit_error"] <= 0.1 * r["max_logit"], mode
        # a random model's top-2 logits are often within FP8 noise of each other: measured 0.91 / 0.94
        assert r["teacher_forced_argmax_agreement"] >= 0.8, mode


def test_an_fp8_checkpoint_converts_back_to_its_dequantized_bf16(checkpoints, tmp_path):
    out = convert(checkpoints["fp8"], tmp_path / "bf16", progress=False)
    got, want = load_file(out / "model.safetensors"), load_file(checkpoints["dequantized"] / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_fp8_checkpoint_places_onto_a_mesh(checkpoints):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    sharded = llama_jax.load(checkpoints["fp8"], mesh=mesh)
    w2, scale = sharded.layers.feed_forward.w2[...], sharded.layers.feed_forward.w2_scale[...]
    assert w2.dtype == jnp.float8_e4m3fn and {s.data.shape for s in w2.addressable_shards} == {(N_LAYERS, 64, 96)}
    assert {s.data.shape for s in scale.addressable_shards} == {(N_LAYERS, 64)}
    tokens = jnp.asarray([[1, 50, 300, 7, 9, 411, 2, 33]])
    single = llama_jax.load(checkpoints["fp8"])
    got, want = np.asarray(sharded(tokens)), np.asarray(single(tokens))
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want))


def test_compiled_forward_keeps_weights_fp8_and_the_fp8_mode_dots_in_fp8(checkpoints):
    tokens = jnp.zeros((1, 8), jnp.int32)
    stacked_fp8, stacked_bf16 = f"f8e4m3fn[{N_LAYERS},384,128]", f"bf16[{N_LAYERS},384,128]"
    for mode in ("dequant", "fp8"):
        model = llama_jax.load(checkpoints["fp8"], fp8_matmul=mode)
        compiled = nnx.jit(lambda m, t: m(t)).lower(model, tokens).compile().as_text()
        assert stacked_fp8 in compiled, mode  # the weights enter the program as FP8 ...
        assert stacked_bf16 not in compiled, mode  # ... and no bf16 copy of all layers' weights is made
    lowered = jax.jit(functools.partial(quant.fp8_linear, mode="fp8")).lower(
        jnp.zeros((4, 128), jnp.bfloat16), jnp.zeros((384, 128), jnp.float8_e4m3fn), jnp.ones((384,), jnp.float32)
    )
    dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
    assert dots and all("f8E4M3FN" in line for line in dots)


def test_on_a_gpu_too_small_for_a_layer_copy_the_fp8_model_holds_its_layers_unstacked(checkpoints, monkeypatch):
    """Where the decode step's per-layer copy would not fit beside the stack on a GPU (405B FP8 on 8 H100s;
    forced here), `load` keeps each layer's weights as the sharded buffer it built (`Unstacked`) and never
    stacks them: every program runs the layers one by one from those buffers, with the stacked model's
    logits, tokens and log-probs (generate and the engine), and no second copy is made."""
    from llama_jax.inference import decoding
    from llama_jax.inference.engine import Engine, Request
    from llama_jax.inference.sampling import SamplingParams
    from llama_jax.model import unstacked

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    stacked = llama_jax.load(checkpoints["fp8"], dtype="float32", mesh=mesh)  # float32: the sums agree closely
    assert unstacked.wanted("gpu", 30 << 30, 80 << 30) and not unstacked.wanted("gpu", 20 << 30, 80 << 30)
    assert not unstacked.wanted("tpu", 30 << 30, 80 << 30) and not unstacked.wanted("cpu", 30 << 30, None)
    monkeypatch.setattr(unstacked, "wanted", lambda platform, layer_bytes, device_bytes: True)
    model = llama_jax.load(checkpoints["fp8"], dtype="float32", mesh=mesh)

    w2 = model.layers.feed_forward.w2.get_value()
    assert isinstance(w2, unstacked.Unstacked) and w2.shape == (N_LAYERS, 128, 384) and w2.dtype == jnp.float8_e4m3fn
    assert {s.data.shape for s in w2[1].addressable_shards} == {(64, 96)}  # each layer sharded as the stack was
    assert isinstance(model.dense_ffn.w1.get_value(), unstacked.Unstacked)
    assert decoding.Weights.of(model).layers is None  # the model runs its own buffers

    tokens = jnp.asarray([[1, 50, 300, 7, 9, 411, 2, 33]])
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(stacked(tokens)), rtol=0, atol=1e-6)
    prompts = [[1, 50, 300, 7], [9, 411]]
    for temperature in (0.0, 1.0):
        got, want = (
            llama_jax.generate(m, prompts, max_new_tokens=6, stop_tokens=[], logprobs=True, temperature=temperature)
            for m in (model, stacked)
        )
        assert [r.tokens for r in got] == [r.tokens for r in want]
        np.testing.assert_allclose([r.logprobs for r in got], [r.logprobs for r in want], atol=1e-5)
    requests = [Request(i, p, SamplingParams(max_new_tokens=6, temperature=1.0, seed=i)) for i, p in enumerate(prompts)]
    got, want = (
        sorted((r.id, out.tokens) for r, out in Engine(m, slots=2, pages=16, page_size=8).run(requests))
        for m in (model, stacked)
    )
    assert got == want
    assert model not in decoding._LAYER_WEIGHTS

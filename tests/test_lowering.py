"""The GPU and TPU programs, proven on this CPU machine: the real prefill, decode loop and training step
(`sampler.lower`, `Trainer.lower_step`) are lowered for "cuda" and "tpu" and the StableHLO is read.

Traced under `platform.lowering_for(<platform>)`, so attention "auto" picks what it picks on that
machine (`attention.select`). Shown: bf16 prefill on cuda runs cuDNN's fused attention, on tpu the
splash kernel (a Mosaic `tpu_custom_call`; forward and backward in the training step); FP8 models in
"fp8" mode multiply f8E4M3FN × f8E4M3FN with no upcast of the FP8 weights; no host callback anywhere
in the decode program; the KV cache (prefill) and the decode state that holds it are donated, as are
the training step's master params and optimizer state.

What lowering here cannot do, exactly:
- cuDNN attention for "cuda" stops at trace time with `RuntimeError: cuDNN is not detected.`:
  `jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version` asks the jax CUDA plugin (absent
  here) for the cuDNN version. That is a Python guard only; the `__cudnn$fmha*` custom call is built by
  jax itself. The `cudnn` fixture stands in version 9.10 for the guard, nothing else.
- cuDNN attention for "tpu" has no lowering rule (`MLIR translation rule for primitive
  'dot_product_attention_fwd' not found for platform tpu`): TPU programs must not select it.
- A host callback cannot be lowered for "cuda" here at all (`the platform for the specified backend
  cpu is different from the lowering platform cuda`); callbacks are looked for in the cpu lowering too.
- These tests read lowered StableHLO. The programs compiled for TPU and H100 (with libtpu and the CUDA
  plugin, no hardware: layouts, copies, FP8 GEMMs, fused attention, memory) are read by
  `tests/test_compiled_targets.py`; `benchmarks/device_check.py` times them on a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.inference import sampler
from llama_jax.jobs.train import TrainConfig, Trainer
from llama_jax.model import platform as platform_module
from llama_jax.model import quant
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.model import Llama
from llama_jax.model.options import Options

# head_dim 128, as every Llama 3 size: the shape cuDNN's and splash's kernels are built for.
CONFIG = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=512, max_seq_len=1024)
PROMPTS = [[3] * 200, [5] * 77]  # a 256-token prompt bucket
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def cudnn():
    """Let jax's cuDNN attention trace without the CUDA plugin (see the module docstring)."""
    from jax._src.cudnn import fused_attention_stablehlo

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
        yield


def _model(*, attention="auto", fp8_matmul=None) -> Llama:
    fp8 = None if fp8_matmul is None else quant.Fp8Spec(tuple(range(CONFIG.n_layers)), matmul=fp8_matmul)
    return Llama(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), options=Options(attention_backend=attention, fp8=fp8))


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)", text))


def _main_args(text: str) -> list[tuple[str, str]]:
    """(tensor type, attributes) of each argument of the lowered module's `main`."""
    header = next(line for line in text.splitlines() if "func.func public @main(" in line)
    return re.findall(r"%arg\d+: tensor<([^>]*)>(?: \{([^}]*)\})?", header.split(") ->")[0])


def _donated(attributes: str) -> bool:
    return "tf.aliasing_output" in attributes or "jax.buffer_donor" in attributes


def _cache_type(batch: int, length: int, platform: str) -> str:
    """The MLIR tensor type of one cache buffer (`KVCache.shape`): on a GPU one buffer per layer
    (`decoding.by_layer`), elsewhere the whole stack."""
    shape = KVCache.shape(CONFIG, batch, length)
    return "x".join(map(str, shape[1:] if platform == "cuda" else shape)) + "xbf16"


def host_callbacks(text: str) -> list[str]:
    """Lines of a lowered module that hand control to the host: Python callbacks, send/recv, outfeed."""
    pattern = r"custom_call @\w*callback\w*|stablehlo\.(send|recv|outfeed|infeed)\b"
    return [line.strip()[:160] for line in text.splitlines() if re.search(pattern, line)]


# ---- fused attention: cuDNN on cuda, splash on tpu ----------------------------------------------------


def _cudnn_calls(text: str) -> set[str]:
    return {c for c in _custom_calls(text) if c.startswith("__cudnn$fmha")}


def _splash_calls(text: str) -> list[str]:
    """Mosaic kernels: `tpu_custom_call`s (splash is the only Pallas kernel the model can select)."""
    return re.findall(r"custom_call @tpu_custom_call", text)


def test_bf16_prefill_for_cuda_runs_cudnn_fused_attention(cudnn):
    model = _model()
    # The same program traced for this CPU first: the target is in the jit cache key, never mixed up.
    here, _ = sampler.lower(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    prefill, _ = sampler.lower(model, PROMPTS, max_new_tokens=NEW_TOKENS, platforms=("cuda",))
    assert _cudnn_calls(here.as_text()) == set()
    assert _cudnn_calls(prefill.as_text()) == {"__cudnn$fmhaSoftmax"}
    # ... and the check can fail: the dense backend lowers to plain dots.
    dense, _ = sampler.lower(_model(attention="dense"), PROMPTS, max_new_tokens=NEW_TOKENS, platforms=("cuda",))
    assert _cudnn_calls(dense.as_text()) == set()


def test_bf16_prefill_for_tpu_runs_the_splash_kernel():
    prefill, _ = sampler.lower(_model(), PROMPTS, max_new_tokens=NEW_TOKENS, platforms=("tpu",))
    assert _splash_calls(prefill.as_text())
    dense, _ = sampler.lower(_model(attention="dense"), PROMPTS, max_new_tokens=NEW_TOKENS, platforms=("tpu",))
    assert _splash_calls(dense.as_text()) == []


def _train_batch(rows: int = 2, length: int = 128) -> dict[str, np.ndarray]:
    ones = np.ones((rows, length), np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    return {
        "tokens": ones,
        "targets": ones,
        "loss_mask": ones.astype(np.float32),
        "positions": positions,
        "segment_ids": ones,
    }


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_training_step_lowers_and_donates_its_master_params_and_optimizer_state(platform, cudnn):
    trainer = Trainer(_model(), TrainConfig(batch_size=2, steps=1, warmup_steps=0))
    text = trainer.lower_step(_train_batch(), platforms=(platform,)).as_text()
    donated = sum(_donated(attrs) for _, attrs in _main_args(text))
    assert donated == len(jax.tree.leaves(trainer.params)) + len(jax.tree.leaves(trainer.opt_state))
    if platform == "tpu":  # splash takes packed segment ids natively: its kernel forward and backward
        assert len(_splash_calls(text)) >= 2
    else:  # cuDNN is not selected with segment ids (attention.select): packed training rows run without it
        assert _cudnn_calls(text) == set()


def test_an_unpacked_training_step_for_cuda_runs_cudnn_attention_forward_and_backward(cudnn):
    model = _model(attention="cudnn")
    loss = lambda m, t: m(t).astype(jnp.float32).mean()  # noqa: E731
    grad = jax.jit(lambda state, t: jax.grad(lambda s: loss(nnx.merge(graphdef, s), t))(state))
    graphdef, state = nnx.split(model)
    with platform_module.lowering_for("cuda"):
        text = grad.trace(state, np.ones((2, 128), np.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert _cudnn_calls(text) == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}


# ---- FP8 × FP8 matmuls -----------------------------------------------------------------------------------

FP8 = "f8E4M3FN"


def fp8_dots(text: str) -> list[str]:
    """dot_generals whose two operands are both f8E4M3FN."""
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return [d for d in dots if re.search(rf"\(tensor<[^>]*x{FP8}>, tensor<[^>]*x{FP8}>\)", d)]


def fp8_upcasts(text: str) -> list[str]:
    """converts FROM f8E4M3FN to anything: an FP8 weight (or activation) copied into a wider dtype."""
    return [
        line.strip()[:160]
        for line in text.splitlines()
        if re.search(rf"stablehlo\.convert .*\(tensor<[^>]*x{FP8}>\)", line)
    ]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_fp8_mode_multiplies_fp8_by_fp8_and_never_upcasts_the_fp8_weights(platform):
    prefill, decode = sampler.lower(_model(fp8_matmul="fp8"), PROMPTS, max_new_tokens=NEW_TOKENS, platforms=(platform,))
    # The decode step's per-layer copy fuses w1|w3 into one FP8 weight (its per-column scales
    # concatenated): w13 and w2 per layer. Prefill on a TPU: w1, w3, w2 once in the layer scan's body; on
    # a GPU it reads the per-layer copy too (`decoding.by_layer`).
    assert len(fp8_dots(prefill.as_text())) == (2 * CONFIG.n_layers if platform == "cuda" else 3)
    assert len(fp8_dots(decode.as_text())) == 2 * CONFIG.n_layers
    assert fp8_upcasts(prefill.as_text()) == [] and fp8_upcasts(decode.as_text()) == []


def test_the_fp8_checks_see_the_dequant_mode_upcast():
    prefill, decode = sampler.lower(
        _model(fp8_matmul="dequant"), PROMPTS, max_new_tokens=NEW_TOKENS, platforms=("cuda",)
    )
    assert fp8_dots(decode.as_text()) == []
    assert fp8_upcasts(decode.as_text())


# ---- the decode loop: on device, over a donated cache ---------------------------------------------------


@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
def test_generation_has_no_host_callback_and_donates_the_kv_cache(platform):
    prefill, decode = sampler.lower(_model(), PROMPTS, max_new_tokens=NEW_TOKENS, platforms=(platform,))
    prefill_text, decode_text = prefill.as_text(), decode.as_text()
    assert "stablehlo.while" in decode_text
    assert host_callbacks(prefill_text) == [] and host_callbacks(decode_text) == []
    cache = _cache_type(2, 256 + NEW_TOKENS, platform)
    buffers = 2 * (CONFIG.n_layers if platform == "cuda" else 1)  # k and v, per layer on a GPU
    for text in (prefill_text, decode_text):  # prefill takes the cache, decode the state holding it
        cache_args = [attrs for kind, attrs in _main_args(text) if kind == cache]
        assert len(cache_args) == buffers and all(_donated(a) for a in cache_args), cache_args


def test_the_callback_check_sees_a_print_inside_a_while_loop():
    def loop(x):
        def body(i):
            jax.debug.print("step {}", i)
            return i + 1

        return jax.lax.while_loop(lambda i: i < x, body, 0)

    traced = jax.jit(loop).trace(jnp.int32(3))
    assert host_callbacks(traced.lower(lowering_platforms=("cpu",)).as_text())
    # Lowered for a GPU from this machine, a host callback does not even lower (it needs the GPU
    # backend's client): one more way a callback in the decode loop could not pass unseen.
    with pytest.raises(ValueError, match="different from the lowering platform cuda"):
        traced.lower(lowering_platforms=("cuda",))


def test_the_donation_check_sees_an_undonated_cache():
    f = jax.jit(lambda cache: cache + 1)
    cache = jax.ShapeDtypeStruct((2, 1, 8, 1, 128), jnp.bfloat16)
    kept = _main_args(f.trace(cache).lower(lowering_platforms=("cuda",)).as_text())
    donated = _main_args(
        jax.jit(lambda c: c + 1, donate_argnums=0).trace(cache).lower(lowering_platforms=("cuda",)).as_text()
    )
    assert not _donated(kept[0][1]) and _donated(donated[0][1])

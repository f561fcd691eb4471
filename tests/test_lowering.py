"""The GPU and TPU programs, proven on this CPU machine: the real prefill, decode loop and training step
(`sampler.lower`, `Trainer.lower_step`) are lowered for "cuda" and "tpu" and the StableHLO is read.

Shown: bf16 prefill on cuda runs cuDNN's fused attention (forward, and backward in the training step);
FP8 models in "fp8" mode multiply f8E4M3FN × f8E4M3FN with no upcast of the FP8 weights; no host
callback anywhere in the decode program; the KV cache (prefill) and the decode state that holds it are
donated, as are the training step's master params and optimizer state.

What lowering here cannot do, exactly:
- cuDNN attention for "cuda" stops at trace time with `RuntimeError: cuDNN is not detected.`:
  `jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version` asks the jax CUDA plugin (absent
  here) for the cuDNN version. That is a Python guard only; the `__cudnn$fmha*` custom call is built by
  jax itself. The `cudnn` fixture stands in version 9.10 for the guard, nothing else.
- cuDNN attention for "tpu" has no lowering rule (`MLIR translation rule for primitive
  'dot_product_attention_fwd' not found for platform tpu`): TPU programs must not select it.
- Compiling (`.compile()`) for either platform needs its plugin and hardware, so these tests read
  lowered StableHLO; the compiled GPU program (cuBLAS FP8 GEMMs) is checked by
  `benchmarks/device_check.py` on a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax import quant, sampler
from llama_jax.config import LlamaConfig
from llama_jax.model import Llama
from llama_jax.train import TrainConfig, Trainer

# head_dim 128, as every Llama 3 size: the shape cuDNN's and splash's kernels are built for.
CONFIG = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=512, norm_eps=1e-5,
                     rope_theta=500_000.0, max_seq_len=1024)  # fmt: skip
PROMPTS = [[3] * 200, [5] * 77]  # a 256-token prompt bucket
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def cudnn():
    """Let jax's cuDNN attention trace without the CUDA plugin (see the module docstring)."""
    from jax._src.cudnn import fused_attention_stablehlo

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
        yield


def _model(*, attention_impl=None, fp8_matmul=None) -> Llama:
    fp8 = None if fp8_matmul is None else quant.Fp8Spec(tuple(range(CONFIG.n_layers)), matmul=fp8_matmul)
    return Llama(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), attention_impl=attention_impl, fp8=fp8)


def _custom_calls(text: str) -> set[str]:
    return set(re.findall(r"custom_call @([\w$.]+)", text))


def _main_args(text: str) -> list[tuple[str, str]]:
    """(tensor type, attributes) of each argument of the lowered module's `main`."""
    header = next(line for line in text.splitlines() if "func.func public @main(" in line)
    return re.findall(r"%arg\d+: tensor<([^>]*)>(?: \{([^}]*)\})?", header.split(") ->")[0])


def _donated(attributes: str) -> bool:
    return "tf.aliasing_output" in attributes or "jax.buffer_donor" in attributes


def _cache_type(batch: int, length: int) -> str:
    c = CONFIG
    return f"{c.n_layers}x{batch}x{length}x{c.n_kv_heads}x{c.head_dim}xbf16"


def host_callbacks(text: str) -> list[str]:
    """Lines of a lowered module that hand control to the host: Python callbacks, send/recv, outfeed."""
    pattern = r"custom_call @\w*callback\w*|stablehlo\.(send|recv|outfeed|infeed)\b"
    return [line.strip()[:160] for line in text.splitlines() if re.search(pattern, line)]


# ---- cuDNN fused attention on cuda -----------------------------------------------------------------------


def test_bf16_prefill_for_cuda_runs_cudnn_fused_attention(cudnn):
    prefill, _ = sampler.lower(_model(attention_impl="cudnn"), PROMPTS, NEW_TOKENS, platforms=("cuda",))
    assert "__cudnn$fmhaSoftmax" in _custom_calls(prefill.as_text())
    # ... and the check can fail: the XLA attention lowers to plain dots.
    xla, _ = sampler.lower(_model(attention_impl="xla"), PROMPTS, NEW_TOKENS, platforms=("cuda",))
    assert not any(c.startswith("__cudnn$fmha") for c in _custom_calls(xla.as_text()))


def test_training_step_for_cuda_runs_cudnn_attention_forward_and_backward_and_donates_its_state(cudnn):
    trainer = Trainer(_model(attention_impl="cudnn"), TrainConfig(batch_size=2, steps=1, warmup_steps=0))
    batch = {
        "tokens": np.ones((2, 128), np.int32),
        "targets": np.ones((2, 128), np.int32),
        "loss_mask": np.ones((2, 128), np.float32),
        "positions": np.tile(np.arange(128, dtype=np.int32), (2, 1)),
        "segment_ids": np.ones((2, 128), np.int32),
    }
    text = trainer.lower_step(batch, platforms=("cuda",)).as_text()
    calls = _custom_calls(text)
    assert any(c.startswith("__cudnn$fmha") and "Backward" not in c for c in calls), calls
    assert any(c.startswith("__cudnn$fmha") and c.endswith("Backward") for c in calls), calls
    donated = sum(_donated(attrs) for _, attrs in _main_args(text))
    assert donated == len(jax.tree.leaves(trainer.params)) + len(jax.tree.leaves(trainer.opt_state))


# ---- FP8 × FP8 matmuls -----------------------------------------------------------------------------------

FP8 = "f8E4M3FN"


def fp8_dots(text: str) -> list[str]:
    """dot_generals whose two operands are both f8E4M3FN."""
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return [d for d in dots if re.search(rf"\(tensor<[^>]*x{FP8}>, tensor<[^>]*x{FP8}>\)", d)]


def fp8_upcasts(text: str) -> list[str]:
    """converts FROM f8E4M3FN to anything: an FP8 weight (or activation) copied into a wider dtype."""
    return [line.strip()[:160] for line in text.splitlines() if re.search(rf"stablehlo\.convert .*\(tensor<[^>]*x{FP8}>\)", line)]  # fmt: skip


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_fp8_mode_multiplies_fp8_by_fp8_and_never_upcasts_the_fp8_weights(platform):
    prefill, decode = sampler.lower(_model(fp8_matmul="fp8"), PROMPTS, NEW_TOKENS, platforms=(platform,))
    # w1, w3, w2: once in the layer scan's body (prefill), once per layer in the decode step.
    assert len(fp8_dots(prefill.as_text())) == 3
    assert len(fp8_dots(decode.as_text())) == 3 * CONFIG.n_layers
    assert fp8_upcasts(prefill.as_text()) == [] and fp8_upcasts(decode.as_text()) == []


def test_the_fp8_checks_see_the_dequant_mode_upcast():
    prefill, decode = sampler.lower(_model(fp8_matmul="dequant"), PROMPTS, NEW_TOKENS, platforms=("cuda",))
    assert fp8_dots(decode.as_text()) == []
    assert fp8_upcasts(decode.as_text())


# ---- the decode loop: on device, over a donated cache ---------------------------------------------------


@pytest.mark.parametrize("platform", ["cuda", "tpu", "cpu"])
def test_generation_has_no_host_callback_and_donates_the_kv_cache(platform):
    prefill, decode = sampler.lower(_model(), PROMPTS, NEW_TOKENS, platforms=(platform,))
    prefill_text, decode_text = prefill.as_text(), decode.as_text()
    assert "stablehlo.while" in decode_text
    assert host_callbacks(prefill_text) == [] and host_callbacks(decode_text) == []
    cache = _cache_type(2, 256 + NEW_TOKENS)
    for text in (prefill_text, decode_text):  # prefill takes the cache, decode the state holding it
        cache_args = [attrs for kind, attrs in _main_args(text) if kind == cache]
        assert len(cache_args) == 2 and all(_donated(a) for a in cache_args), cache_args  # k and v


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
    donated = _main_args(jax.jit(lambda c: c + 1, donate_argnums=0).trace(cache).lower(lowering_platforms=("cuda",)).as_text())  # fmt: skip
    assert not _donated(kept[0][1]) and _donated(donated[0][1])

"""The FP8 feed-forward: which weights are FP8, in which layers, and how a checkpoint's FP8 tensors fill a model.

The Llama 3.1 405B FP8 release (HF `fbgemm_fp8`; Meta `fp8_scales_{rank}.pt`) stores the FFN weights
w1, w3, w2 of layers 1..L-2 as rowwise float8_e4m3fn with one float32 scale per output channel;
attention, norms, embeddings, the head and the first and last layers' FFNs stay bf16
(llama-models `llama3/quantization/loader.py`, `convert_to_fp8_quantized_model`).
This module is the one place that knows those paths (`PATHS`) and that layer choice (`release_layers`).

The model (`Llama(fp8=quant.Fp8Spec(...))`, the math in `quant.py`) keeps the FP8 weights stacked over
all L layers, so the scan over layers stays uniform: the unquantized layers' slots hold zeros (never
read) and scale 1, and those layers' weights live in `Llama.dense_ffn`, stacked over them only. `fills`
says where each stored tensor goes (the FP8 ones output channel first, as the release stores them and
the FP8 GEMM reads them; checkpoints answer in our input-first layout, so writers are unchanged);
`unquantized` is what a writer that does not keep FP8 stores.
"""

from __future__ import annotations

import functools

import jax
import ml_dtypes
import numpy as np

from llama_jax.model import platform, quant
from llama_jax.model.config import LlamaConfig
from llama_jax.weights import layout
from llama_jax.weights.checkpoint import Checkpoint, Place, to_device

WEIGHTS = ("w1", "w3", "w2")
PATHS = frozenset(("layers", "feed_forward", w) for w in WEIGHTS)
HF_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)


def release_layers(n_layers: int) -> tuple[int, ...]:
    """The layers whose FFN the FP8 release quantizes: all but the first and the last (llama-models'
    `llama3/quantization/loader.py`; HF's `modules_to_not_convert` for the 405B FP8 checkpoint)."""
    return tuple(range(1, n_layers - 1))


def spec(ckpt: Checkpoint, matmul: str = "auto", device: jax.Device | None = None) -> quant.Fp8Spec | None:
    """The `Fp8Spec` a model of `ckpt` runs with (None: no FP8 weights); `matmul` as `platform.fp8_matmul`."""
    if not ckpt.fp8_layers:
        return None
    return quant.Fp8Spec(
        tuple(ckpt.fp8_layers), matmul=platform.fp8_matmul(matmul, device), activation_scale_ub=ckpt.activation_scale_ub
    )


def fills(
    ckpt: Checkpoint, param: layout.Path, fp8_spec: quant.Fp8Spec
) -> list[tuple[layout.Path, np.dtype | None, list[Place | None]]]:
    """(model parameter, dtype (None: the model's), one `Place` or None per stacked row) for FFN weight `param`.

    None leaves a row as the preallocated zeros: the FP8 slot of a layer whose FFN is in `dense_ffn`.
    """
    w, n = param[-1], ckpt.config.n_layers
    quantized = set(fp8_spec.quantized_layers)
    slots = [functools.partial(_place_fp8, ckpt, param, i) if i in quantized else None for i in range(n)]
    scales = [functools.partial(_place_scale, ckpt, param, i if i in quantized else None) for i in range(n)]
    out = [(param, np.dtype(quant.FP8), slots), (param[:-1] + (w + "_scale",), np.dtype(np.float32), scales)]
    dense = fp8_spec.dense_layers(n)
    if dense:
        out.append((("dense_ffn", w), None, [functools.partial(ckpt.place, param, i) for i in dense]))
    return out


def _place_fp8(ckpt: Checkpoint, param: layout.Path, layer: int, target: jax.ShapeDtypeStruct) -> jax.Array:
    """FP8 weight `param` of `layer` placed output channel first (`quant`'s FP8 layout, the release's
    own): transposed here, once, as each device reads its slice, so that no program transposes it."""
    return to_device(ckpt.tensor(param, layer).T, target)


def _place_scale(ckpt: Checkpoint, param: layout.Path, layer: int | None, target: jax.ShapeDtypeStruct) -> jax.Array:
    scale = np.ones(target.shape, np.float32) if layer is None else ckpt.fp8_scale(param, layer).reshape(target.shape)
    return to_device(scale, target)


def unquantized(ckpt: Checkpoint, param: layout.Path, layer: int | None) -> np.ndarray:
    """One tensor in our layout as numpy; an FP8 weight dequantized exactly, then rounded to bfloat16 (what
    the release's FFNs are in bf16, and what a writer that does not keep FP8 stores)."""
    if layer in ckpt.fp8_layers and param in PATHS:
        return ckpt.dequantized(param, layer).astype(ml_dtypes.bfloat16)
    return np.asarray(ckpt.tensor(param, layer))


def unquantized_dtype(ckpt: Checkpoint, param: layout.Path) -> np.dtype:
    """The dtype `unquantized` gives `param` (bfloat16 where the source stores FP8)."""
    dtype = np.dtype(ckpt.stored_dtype(param))
    return np.dtype(ml_dtypes.bfloat16) if dtype == DTYPE else dtype


def check_source_tensor(ckpt, rule: layout.Rule, name: str, want, expected: set[str]) -> list[str]:
    """Problems with FP8 tensor `name` of an HF or Meta checkpoint: only the FFN weights of a quantized
    checkpoint may be FP8. HF (fbgemm_fp8) stores a float32 `weight_scale` [out, 1] beside each; Meta's
    reader checks its `fp8_scales_{rank}.pt` itself."""
    if rule.path not in PATHS or not getattr(ckpt, "quantization", None):
        return [
            f"tensor {name!r} in {ckpt.where(name)} is float8_e4m3fn; only the FFN weights of a quantized "
            f"checkpoint (HF quantization_config 'fbgemm_fp8', Meta fp8_scales_N.pt) may be FP8"
        ]
    if ckpt.fmt != "hf":
        return []
    scale = name[: -len("weight")] + "weight_scale"
    expected.add(scale)
    if scale not in ckpt.names():
        return [f"FP8 tensor {name!r} has no {scale!r}"]
    if ckpt.shape(scale) != (want[0], 1):
        return [f"tensor {scale!r} in {ckpt.where(scale)} has shape {list(ckpt.shape(scale))}, expected {[want[0], 1]}"]
    return []


def hf_quantization_config(config: LlamaConfig) -> dict:
    """HF's fbgemm_fp8 config for the release's choice: every linear module that stays bf16, by full module path."""
    keep = ["lm_head"]
    quantized = release_layers(config.n_layers)
    for i in range(config.n_layers):
        keep += [f"model.layers.{i}.self_attn.{p}_proj" for p in "qkvo"]
        if i not in quantized:
            keep += [f"model.layers.{i}.mlp.{HF_PROJECTIONS[w]}" for w in WEIGHTS]
    return {
        "quant_method": "fbgemm_fp8",
        "activation_scale_ub": quant.ACTIVATION_SCALE_UB,
        "modules_to_not_convert": keep,
    }

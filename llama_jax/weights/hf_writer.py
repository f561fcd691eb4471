"""Writing HF checkpoints: `config.json` + `model.safetensors` (or shards with an index), bf16/fp32 or FP8.

Streaming: every tensor is a lazy entry (shape and dtype known up front, bytes computed when that
tensor is written), so `write_safetensors` can write each shard's header first and the host holds one
tensor at a time, never the model. `config.json` is written last: before it exists the directory is
no HF checkpoint.

FP8 (`quantize="fp8"`): the FFN weights of the release's layers (`fp8.release_layers`) as rowwise
float8_e4m3fn with a float32 `weight_scale` [out, 1] and HF's `fbgemm_fp8` quantization config. An FP8
source's values and scales are kept as stored; other sources are quantized as FBGEMM does.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Callable

import ml_dtypes
import numpy as np

from llama_jax.model import quant
from llama_jax.weights import atomic, fp8, layout
from llama_jax.weights.checkpoint import Checkpoint
from llama_jax.weights.safetensors_io import write_safetensors

# Files beside an HF checkpoint's weights that a converted HF directory should keep.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class _Lazy:
    """A tensor whose shape and dtype are known now and whose bytes are computed when asked for."""

    def __init__(self, shape, dtype, compute: Callable[[], np.ndarray], on_read: Callable[[], None] = lambda: None):
        self.shape, self.dtype, self._compute, self._on_read = tuple(shape), np.dtype(dtype), compute, on_read

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._compute(), dtype=self.dtype)
        if array.shape != self.shape:
            raise ValueError(f"internal layout error: built {array.shape}, expected {self.shape}")
        self._on_read()
        return array


def _tensors(ckpt: Checkpoint, dtype, quantize: str | None, bar) -> list[tuple[str, _Lazy]]:
    """Every HF tensor as a lazy entry, in HF's order (embeddings, layer by layer, norm, head)."""
    config = ckpt.config
    quantized = set(fp8.release_layers(config.n_layers)) if quantize == "fp8" else set()
    out: list[tuple[str, _Lazy]] = []

    def entry(rule: layout.Rule, i: int | None):
        name = rule.hf if i is None else rule.hf.format(i=i)
        shape = rule.source_shape(config)

        def hf_layout():
            ckpt.release()
            return rule.to_source(fp8.unquantized(ckpt, rule.path, i), config)

        if i not in quantized or rule.path not in fp8.PATHS:
            tensor_dtype = np.dtype(dtype) if dtype is not None else fp8.unquantized_dtype(ckpt, rule.path)
            out.append((name, _Lazy(shape, tensor_dtype, hf_layout, bar)))
            return
        memo: dict[str, np.ndarray] = {}

        def weight():
            # weight and weight_scale come from one quantization; the scale, written next, reuses it.
            if i in ckpt.fp8_layers:  # an FP8 source's values and scales are kept as stored
                ckpt.release()
                memo["scale"] = ckpt.fp8_scale(rule.path, i).reshape(-1, 1).astype(np.float32)
                return rule.to_source(np.asarray(ckpt.tensor(rule.path, i)), config)
            q, memo["scale"] = quant.quantize_rowwise_np(hf_layout())
            return q

        def scale():
            return memo.pop("scale") if "scale" in memo else quant.quantize_rowwise_np(hf_layout())[1]

        out.append((name, _Lazy(shape, fp8.DTYPE, weight, bar)))
        out.append((name[: -len(".weight")] + ".weight_scale", _Lazy((shape[0], 1), np.float32, scale)))

    rules = {r.path: r for r in layout.rules_for(config)}
    entry(rules[("tok_embeddings",)], None)
    for i in range(config.n_layers):
        for rule in rules.values():
            if rule.per_layer:
                entry(rule, i)
    for path in (("norm", "weight"), ("output",)):
        if path in rules:
            entry(rules[path], None)
    return out


def write_hf(ckpt: Checkpoint, out: pathlib.Path, dtype, quantize: str | None, max_shard_size: int, bar) -> None:
    """Every tensor of `ckpt` into HF safetensors shards of at most `max_shard_size` bytes in `out`."""
    config = ckpt.config
    tensors = _tensors(ckpt, dtype, quantize, bar)
    shards: list[list[tuple[str, _Lazy]]] = [[]]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += t.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0], metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / file, shard, metadata=metadata)
            weight_map.update({name: file for name, _ in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for _, t in tensors)}, "weight_map": weight_map}
        atomic.write_atomically(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    hf = config.to_hf_config()
    stored = {t.dtype.name for _, t in tensors if t.dtype != fp8.DTYPE and t.shape[-1] != 1}
    hf["torch_dtype"] = "bfloat16" if np.dtype(ml_dtypes.bfloat16).name in stored else sorted(stored)[0]
    if quantize == "fp8":
        hf["quantization_config"] = fp8.hf_quantization_config(config)
    if ckpt.path is not None:
        for side in SIDE_FILES:
            if (ckpt.path / side).is_file():
                shutil.copyfile(ckpt.path / side, out / side)
    atomic.write_atomically(out / "config.json", json.dumps(hf, indent=2))

"""The one interface every weight source implements, and the one way a source tensor reaches its devices.

A `Checkpoint` is a model's weights in some stored form: HF safetensors (`hf.py`), Meta consolidated
shards (`meta.py`), our Orbax format (`orbax.py`), the embedded random default (`default_model.py`), or
an in-memory `Llama` (`ModelCheckpoint`, what `convert.save` writes). Whatever the form, it answers in
our layout (`layout.py`), one parameter (one layer of it) at a time:

    config, score_labels          the architecture it holds
    fp8_layers                    layers whose FFN weights are stored rowwise FP8 (`llama_jax.weights.fp8`)
    check()                       every problem with the stored tensors, in one error
    stored_dtype(param)           the dtype a tensor is stored in
    tensor(param, layer)          an array-like in our layout that reads bytes only when sliced
    fp8_scale(param, layer)       float32 [out], for the FP8 layers' FFN weights
    dequantized(param, layer)     an FP8 weight as exact float32
    place(param, layer, target)   the tensor on its devices, each device reading only its slice
    release()                     forget the memory-mapped pages read so far

`loading.load_from` fills a model through `place`; `convert` reads through `tensor`. Sources only
override what they do differently (Orbax places by restoring straight into the target sharding).
"""

from __future__ import annotations

import mmap
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from llama_jax.model import quant
from llama_jax.model.config import LlamaConfig
from llama_jax.weights import layout

ArrayLike = Any  # numpy arrays and views, or `lazy.LazyArray`s: `.shape`, `.dtype`, `[index]` reads a slice
Place = Callable[[jax.ShapeDtypeStruct], jax.Array]  # a target (shape, dtype, sharding) -> that array placed


class Checkpoint:
    """Defaults for every source; a source sets `path`, `config` and implements `check`, `stored_dtype`, `tensor`."""

    path: pathlib.Path | None = None
    config: LlamaConfig
    score_labels: int | None = None  # a sequence classifier's `score` head (HF LlamaForSequenceClassification)
    fp8_layers: tuple[int, ...] = ()
    activation_scale_ub: float = quant.ACTIVATION_SCALE_UB

    def check(self) -> None:
        raise NotImplementedError

    def stored_dtype(self, param: layout.Path) -> np.dtype:
        raise NotImplementedError

    def tensor(self, param: layout.Path, layer: int | None) -> ArrayLike:
        raise NotImplementedError

    def fp8_scale(self, param: layout.Path, layer: int) -> np.ndarray:
        raise ValueError(f"{self.path}: {'.'.join(param)} of layer {layer} is not stored in FP8")

    def dequantized(self, param: layout.Path, layer: int) -> np.ndarray:
        return np.asarray(self.tensor(param, layer)).astype(np.float32) * self.fp8_scale(param, layer)

    def place(self, param: layout.Path, layer: int | None, target: jax.ShapeDtypeStruct) -> jax.Array:
        return to_device(self.tensor(param, layer), target)

    def release(self) -> None:
        """Memory-mapped sources drop the pages read so far (they count in the resident set until unmapped)."""

    def rule(self, param: layout.Path) -> layout.Rule:
        if getattr(self, "_rules", None) is None:
            self._rules = {r.path: r for r in layout.rules_for(self.config, self.score_labels)}
        return self._rules[param]


def to_device(array: ArrayLike, target: jax.ShapeDtypeStruct) -> jax.Array:
    """`array` on `target.sharding`: each device's callback reads only its own slice of it."""
    if tuple(array.shape) != tuple(target.shape):
        raise ValueError(f"internal layout error: built {array.shape}, parameter needs {target.shape}")
    dtype = target.dtype
    placed = jax.make_array_from_callback(
        tuple(target.shape), target.sharding, lambda index: np.asarray(array[index], dtype=dtype)
    )
    _release_mapped_pages(array)
    return placed


def _release_mapped_pages(array: ArrayLike) -> None:
    """Drop the memory-mapped checkpoint pages behind `array` from this process's resident set.

    Every device has its slice by now. Left mapped, each page read stays resident until the file
    is closed, so RSS climbs by the whole checkpoint while loading (reclaimable page cache, but
    counted against the process; tests/test_sharding.py bounds the peak).
    The mapping is read-only and shared: a page touched again faults back in from the file.
    """
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    mapped = base.obj if isinstance(base, memoryview) else base
    if not isinstance(mapped, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or array.size == 0:
        return
    start = np.frombuffer(mapped, np.uint8, count=1).ctypes.data
    low, high = np.lib.array_utils.byte_bounds(array)
    begin = (low - start) // mmap.PAGESIZE * mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, begin, min(high - start, len(mapped)) - begin)


class ModelCheckpoint(Checkpoint):
    """An in-memory `Llama` (fine-tuned, or with LoRA merged) read like a checkpoint, one (param, layer) at a time."""

    def __init__(self, model):
        if getattr(model, "lora", None) is not None:
            raise ValueError("the model has LoRA adapters: merge them first (llama_jax.weights.lora.merge(model))")
        if getattr(model, "fp8", None) is not None:
            raise ValueError("saving an FP8-loaded model is not supported: convert its source checkpoint instead")
        if getattr(model, "score", None) is not None:
            raise ValueError("the model is a sequence classifier (score head); saving handles causal LMs only")
        self.model, self.config = model, model.config

    def check(self) -> None:
        """An in-memory model has every parameter by construction."""

    def _param(self, param: layout.Path):
        node = self.model
        for part in param:
            node = getattr(node, part)
        return node

    def stored_dtype(self, param: layout.Path) -> np.dtype:
        return np.dtype(self._param(param).dtype)

    def tensor(self, param: layout.Path, layer: int | None) -> np.ndarray:
        value = self._param(param)[...]
        return np.asarray(jax.device_get(value if layer is None else value[layer]))

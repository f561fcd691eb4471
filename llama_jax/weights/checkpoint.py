"""The interface every checkpoint reader implements, and the checks shared by all of them."""

from __future__ import annotations

import pathlib
from typing import Protocol

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.weights import layout


class Checkpoint(Protocol):
    """A read-only, lazily read set of named tensors in a source layout ("hf" or "meta")."""

    fmt: str
    path: pathlib.Path
    config: LlamaConfig

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def read(self, name: str) -> np.ndarray: ...  # a view where possible; nothing copied whole
    def where(self, name: str) -> str: ...  # the file holding the tensor, for error messages


# Tensors some writers add that carry no weights (HF's non-persistent rotary buffer).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def check(ckpt: Checkpoint) -> None:
    """Every tensor the config needs is present with the right shape and a float dtype; nothing unknown.

    All problems are collected into one error, so a user fixes a broken checkpoint in one go.
    """
    config = ckpt.config
    names = ckpt.names()
    problems: list[str] = []
    expected: set[str] = set()
    for rule in layout.rules_for(config, getattr(ckpt, "score_labels", None)):
        want = rule.source_shape(config)
        for name in layout.source_names(rule, config, ckpt.fmt):
            expected.add(name)
            if name not in names:
                problems.append(f"missing tensor {name!r} (expected shape {list(want)})")
                continue
            got = ckpt.shape(name)
            if got != want:
                problems.append(f"tensor {name!r} in {ckpt.where(name)} has shape {list(got)}, expected {list(want)}")
            dtype = ckpt.dtype(name)
            if dtype.kind not in "fV" and dtype.name not in ("bfloat16", "float8_e4m3fn"):
                problems.append(f"tensor {name!r} in {ckpt.where(name)} has dtype {dtype}, expected a float type")
            if dtype.name == "float8_e4m3fn":
                problems += _check_fp8(ckpt, rule, name, want, expected)
    tied_head = {"lm_head.weight", "output.weight"} if config.tie_embeddings else set()
    unknown = sorted(n for n in names - expected - tied_head if not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        problems.append(f"{len(unknown)} unexpected tensor(s) for this config: {shown}")
    if problems:
        raise ValueError(f"{ckpt.path}: checkpoint does not match its config:\n  - " + "\n  - ".join(problems))


_FP8_PATHS = {("layers", "feed_forward", w) for w in ("w1", "w3", "w2")}


def _check_fp8(ckpt: Checkpoint, rule: layout.Rule, name: str, want, expected: set[str]) -> list[str]:
    """An FP8 weight: an FFN weight of a quantized checkpoint. HF (fbgemm_fp8) stores a float32
    `weight_scale` [out, 1] beside it; Meta's reader checks its `fp8_scales_{rank}.pt` itself."""
    if rule.path not in _FP8_PATHS or not getattr(ckpt, "quantization", None):
        return [f"tensor {name!r} in {ckpt.where(name)} is float8_e4m3fn; only the FFN weights of a quantized "
                f"checkpoint (HF quantization_config 'fbgemm_fp8', Meta fp8_scales_N.pt) may be FP8"]  # fmt: skip
    if ckpt.fmt != "hf":
        return []
    scale = name[: -len("weight")] + "weight_scale"
    expected.add(scale)
    if scale not in ckpt.names():
        return [f"FP8 tensor {name!r} has no {scale!r}"]
    if ckpt.shape(scale) != (want[0], 1):
        return [f"tensor {scale!r} in {ckpt.where(scale)} has shape {list(ckpt.shape(scale))}, expected {[want[0], 1]}"]
    return []

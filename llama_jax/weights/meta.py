"""Meta checkpoints: `params.json` + `consolidated.00.pth` ... `consolidated.NN.pth`.

Each shard is one model-parallel rank. Tensors are split along the axis fairscale's layer split
them (`layout.META_SPLIT_AXIS`) and merged here one tensor at a time. Files are opened with
`torch.load(weights_only=True, mmap=True)`: no code in an untrusted file runs, and a tensor's bytes
are only read when that tensor is merged. torch is needed for this format only.
"""

from __future__ import annotations

import pathlib
import re

import ml_dtypes
import numpy as np

from llama_jax.config import LlamaConfig, read_json
from llama_jax.weights import layout

_SHARD = re.compile(r"consolidated\.(\d+)\.pth$")


def is_meta_checkpoint(path: pathlib.Path) -> bool:
    return (path / "params.json").is_file() and any(_SHARD.search(p.name) for p in path.glob("consolidated.*.pth"))


def shard_files(path: pathlib.Path) -> list[pathlib.Path]:
    """consolidated.00.pth ... in rank order; a gap in the numbering is a missing shard."""
    found = sorted((int(m.group(1)), p) for p in path.glob("consolidated.*.pth") if (m := _SHARD.search(p.name)))
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise FileNotFoundError(
            f"{path}: missing shard(s) " + ", ".join(f"consolidated.{r:02d}.pth" for r in missing)
        )
    return [p for _, p in found]


def torch_to_numpy(t) -> np.ndarray:
    """Zero-copy view of a CPU torch tensor (bfloat16 and float8 included) as numpy."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


class MetaCheckpoint:
    fmt = "meta"

    def __init__(self, path: str | pathlib.Path):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is installed wherever tests run
            raise ImportError("reading Meta .pth checkpoints needs torch: pip install torch") from e
        self.path = pathlib.Path(path)
        self.config = LlamaConfig.from_meta_params(read_json(self.path / "params.json"), source=str(self.path / "params.json"))
        self.files = shard_files(self.path)
        self._shards = []
        for f in self.files:
            try:
                self._shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:
                raise ValueError(f"{f}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e
        first = set(self._shards[0])
        for f, shard in zip(self.files[1:], self._shards[1:], strict=True):
            if set(shard) != first:
                diff = sorted(set(shard) ^ first)[:5]
                raise ValueError(f"{f}: holds different tensor names than {self.files[0].name} (e.g. {diff})")

    @property
    def mp(self) -> int:
        return len(self._shards)

    def names(self) -> set[str]:
        return set(self._shards[0])

    def where(self, name: str) -> str:
        return str(self.files[0]) if self.mp == 1 else f"{self.path}/consolidated.*.pth"

    def _axis(self, name: str) -> int | None:
        try:
            return layout.meta_split_axis(name)
        except KeyError:
            return None

    def shape(self, name: str) -> tuple[int, ...]:
        shape = list(self._shards[0][name].shape)
        axis = self._axis(name)
        if axis is not None and self.mp > 1:
            shape[axis] = sum(s[name].shape[axis] for s in self._shards)
        return tuple(shape)

    def dtype(self, name: str) -> np.dtype:
        return torch_to_numpy(self._shards[0][name][:0]).dtype

    def read(self, name: str) -> np.ndarray:
        parts = [torch_to_numpy(s[name]) for s in self._shards]
        axis = self._axis(name)
        if axis is None or self.mp == 1:
            return parts[0]
        return np.concatenate(parts, axis=axis)

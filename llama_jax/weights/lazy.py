"""Lazy arrays over model-parallel pieces: a device's slice is read from the pieces it overlaps only.

`jax.make_array_from_callback` asks each device's callback for `array[index]` (a tuple of slices).
A Meta checkpoint stores a weight as one piece per model-parallel rank; `Concat` answers that
request by slicing only the pieces under the index and joining those small slices, so the host
never holds a whole merged tensor. Pieces are memory-mapped numpy views (or other lazy parts).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_dtypes
import numpy as np


def _normalize(index, shape: tuple[int, ...]) -> tuple[slice, ...]:
    if not isinstance(index, tuple):
        index = (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - len(index))
    if len(index) != len(shape) or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
        raise IndexError(f"lazy arrays take unit-step slices only, got {index}")
    return tuple(slice(*i.indices(n)[:2]) for i, n in zip(index, shape, strict=True))


class LazyArray:
    """Shape and dtype now; bytes when sliced. Subclasses implement `_read(index)` (normalized)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __getitem__(self, index) -> np.ndarray:
        return self._read(_normalize(index, self.shape))

    def __array__(self, dtype=None, copy=None):
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype)

    def _read(self, index: tuple[slice, ...]) -> np.ndarray:
        raise NotImplementedError

    @property
    def T(self) -> Transposed:  # noqa: N802 (numpy's name: `tensor.T` reads the same for views and lazy arrays)
        return Transposed(self)


class Concat(LazyArray):
    """`np.concatenate(parts, axis)`, evaluated one requested slice at a time."""

    def __init__(self, parts: Sequence, axis: int):
        shapes = [tuple(p.shape) for p in parts]
        rest = {s[:axis] + s[axis + 1 :] for s in shapes}
        if len(rest) != 1:
            raise ValueError(f"pieces of shapes {shapes} do not concatenate along axis {axis}")
        self.parts, self.axis = list(parts), axis
        self.dtype = np.dtype(parts[0].dtype)
        first = shapes[0]
        self.shape = first[:axis] + (sum(s[axis] for s in shapes),) + first[axis + 1 :]

    def _read(self, index):
        lo, hi = index[self.axis].start, index[self.axis].stop
        out, offset = [], 0
        for part in self.parts:
            n = part.shape[self.axis]
            if max(lo, offset) < min(hi, offset + n):
                sub = list(index)
                sub[self.axis] = slice(max(lo, offset) - offset, min(hi, offset + n) - offset)
                out.append(np.asarray(part[tuple(sub)]))
            offset += n
        if not out:
            return np.zeros(tuple(s.stop - s.start for s in index), self.dtype)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=self.axis)


class Identical(LazyArray):
    """One of several copies that must be identical (Meta's duplicated KV heads): every read compares
    all copies' slices and fails, naming `what` and the file of each copy (`where`), if they differ."""

    def __init__(self, copies: Sequence, what: str, where: Sequence[str]):
        self.copies, self.what, self.where = list(copies), what, list(where)
        self.shape, self.dtype = tuple(copies[0].shape), np.dtype(copies[0].dtype)

    def _read(self, index):
        first = np.asarray(self.copies[0][index])
        for k, copy in enumerate(self.copies[1:], 1):
            if np.asarray(copy[index]).tobytes() != first.tobytes():
                raise ValueError(
                    f"{self.where[k]}: {self.what}: duplicated KV head copy {k} differs from copy 0 (in "
                    f"{self.where[0]}); the checkpoint's KV heads are not exact duplicates, so they cannot be merged"
                )
        return first


class Rescaled(LazyArray):
    """FP8 values re-expressed under a larger per-channel scale: fp8(clip(q · factor, ±448)).

    `factor` (float32, ≤ 1) broadcasts along `axis` of `q`. Used when model-parallel ranks quantized
    one output channel with different scales (Meta's FP8 w2) and the model keeps one scale per channel.
    """

    def __init__(self, q, factor: np.ndarray, axis: int):
        self.q, self.factor, self.axis = q, np.asarray(factor, np.float32), axis
        self.shape, self.dtype = tuple(q.shape), np.dtype(ml_dtypes.float8_e4m3fn)

    def _read(self, index):
        values = np.asarray(self.q[index]).astype(np.float32)
        shape = [1] * len(self.shape)
        shape[self.axis] = -1
        factor = self.factor[index[self.axis]].reshape(shape)
        return np.clip(values * factor, -448.0, 448.0).astype(self.dtype)


class Transposed(LazyArray):
    """`base.T`: a slice reads the base's mirrored slice (an FP8 weight placed in the release's [out, in])."""

    def __init__(self, base):
        self.base, self.shape, self.dtype = base, tuple(base.shape)[::-1], np.dtype(base.dtype)

    def _read(self, index):
        return np.asarray(self.base[index[::-1]]).T

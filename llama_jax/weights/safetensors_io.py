"""Zero-copy reading and streaming writing of the safetensors format.

Why not the `safetensors` package's own readers: its numpy and flax bindings (0.8.0) reject
bfloat16 and float8_e4m3fn, the two dtypes Llama checkpoints are stored in, and its writers take
a whole dict of tensors at once. The format is simple and documented (an 8-byte little-endian
header length, a JSON header of name -> {dtype, shape, data_offsets}, then raw bytes), so we
memory-map it: a tensor is a numpy view, a device reads only its slice, and writing streams one
tensor at a time. transformers' `from_pretrained` reading our files is tested.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A memory-mapped .safetensors file: `names()`, `shape(n)`, `dtype(n)`, `array(n)` (a view)."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: safetensors file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise ValueError(
                    f"{self.path}: truncated or not a safetensors file "
                    f"(header length {header_len} but the file has {size} bytes)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._data_start = 8 + header_len
        data_len = size - self._data_start
        for name, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * dtype.itemsize
            if end - begin != expected:
                raise ValueError(
                    f"{self.path}: tensor {name!r} spans {end - begin} bytes but shape "
                    f"{entry['shape']} of {entry['dtype']} needs {expected}"
                )
            if end > data_len:
                raise ValueError(
                    f"{self.path}: truncated: tensor {name!r} needs bytes up to {end} of the data "
                    f"section, which has only {data_len}"
                )
        self._mmap = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def release(self) -> None:
        """Drop the pages read so far from this process's resident set (the mapping stays valid:
        a page touched again faults back in from the file)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def array(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the memory map (nothing is read yet)."""
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = self._entries[name]["data_offsets"]
        dtype = self.dtype(name)
        buf = np.frombuffer(self._mmap, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)
        return buf.view(dtype).reshape(self.shape(name))


def write_safetensors(
    path: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write tensors into `path`, one at a time. Returns the number of data bytes written.

    `tensors` may be a lazy iterable of (name, array) pairs, but their names, shapes and dtypes are
    needed for the header before any data: pass a list of (name, lazy array-like with .shape and
    .dtype) or arrays. The caller is responsible for atomicity (write to a temporary directory).
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, arr in items:
        dtype = np.dtype(arr.dtype)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: cannot store tensor {name!r} of dtype {dtype}")
        nbytes = int(np.prod(arr.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for _name, arr in items:
            data = np.ascontiguousarray(np.asarray(arr))
            f.write(memoryview(data.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    return offset

"""Our own checkpoint format: our parameter layout, saved with Orbax, one item per parameter and layer.

    DST/llama_jax.json                      {"format": "llama-jax-orbax", "version": 2, "config": {...}}
    DST/params/tok_embeddings/              an Orbax `StandardCheckpointer` item: {"value": [V, D]}
    DST/params/layers.attention.wq/00000/   layer 0 of a per-layer parameter: {"value": [D, N, H]}
    ...

Why not one pytree of stacked [L, ...] arrays: a stacked 405B FFN weight alone is ~220 GB. One item
per parameter and layer keeps both directions streaming (the host holds one layer's tensor), and
restoring places each layer straight into its sharded home (`OrbaxCheckpoint.place`), so each device
reads only its slice, written into the preallocated stacked parameter by the one placement loop
(`loading.load_from`).
Arrays are in our layout (`layout.py`: wq [D, N, H], w1 [D, F], ...) in the stored dtype.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import LlamaConfig
from llama_jax.weights import atomic, fp8, layout
from llama_jax.weights.checkpoint import Checkpoint

FORMAT = "llama-jax-orbax"
MANIFEST = "llama_jax.json"
PARAMS = "params"


def is_orbax_checkpoint(path: pathlib.Path) -> bool:
    return (path / MANIFEST).is_file() and (path / PARAMS).is_dir()


def _item(path: pathlib.Path, param: layout.Path, layer: int | None = None) -> pathlib.Path:
    item = (path / PARAMS / ".".join(param)).absolute()
    return item if layer is None else item / f"{layer:05d}"


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


class OrbaxWriter:
    """Writes parameters one at a time into `path` (a fresh temporary directory)."""

    def __init__(self, path: pathlib.Path, config: LlamaConfig):
        self.path = pathlib.Path(path)
        self.config = config
        (self.path / PARAMS).mkdir(parents=True, exist_ok=True)
        self._ckpt = _checkpointer()
        self._dtypes: dict[str, str] = {}

    def write(self, param: layout.Path, layer: int | None, array: np.ndarray) -> None:
        item = _item(self.path, param, layer)
        item.parent.mkdir(parents=True, exist_ok=True)
        self._ckpt.save(item, {"value": np.ascontiguousarray(array)})
        self._ckpt.wait_until_finished()
        self._dtypes[".".join(param)] = np.dtype(array.dtype).name

    def finish(self) -> None:
        # The manifest is written last: a directory without it is never taken for a checkpoint.
        manifest = {"format": FORMAT, "version": 2, "config": self.config.to_dict(), "dtypes": self._dtypes}
        atomic.write_atomically(self.path / MANIFEST, json.dumps(manifest, indent=2))
        self._ckpt.close()


def write_orbax(ckpt: Checkpoint, out: pathlib.Path, dtype, bar) -> None:
    """Every (parameter, layer) of `ckpt` as an item of `out` (`dtype` None: as stored; FP8 dequantized)."""
    writer = OrbaxWriter(out, ckpt.config)
    for rule in layout.rules_for(ckpt.config):
        tensor_dtype = np.dtype(dtype) if dtype is not None else fp8.unquantized_dtype(ckpt, rule.path)
        for i in range(ckpt.config.n_layers) if rule.per_layer else [None]:
            ckpt.release()
            writer.write(rule.path, i, np.asarray(fp8.unquantized(ckpt, rule.path, i), dtype=tensor_dtype))
            bar()
    writer.finish()


class OrbaxCheckpoint(Checkpoint):
    """Reads our Orbax format: each (parameter, layer) is one item, in our layout."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        manifest = json.loads((self.path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != 2:
            raise ValueError(
                f"{self.path / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                f"expected {FORMAT!r} version 2"
            )
        self.config = LlamaConfig.from_dict(manifest["config"], source=str(self.path / MANIFEST))
        self.dtypes = manifest.get("dtypes", {})
        self._ckpt = _checkpointer()

    def check(self) -> None:
        missing = [
            ".".join(r.path) + ("" if i is None else f" layer {i}")
            for r in layout.rules_for(self.config)
            for i in (range(self.config.n_layers) if r.per_layer else [None])
            if not (_item(self.path, r.path, i) / "_METADATA").exists()
        ]
        if missing:
            raise FileNotFoundError(f"{self.path}: Orbax item(s) missing for parameter(s) {missing}")

    def stored_dtype(self, param: layout.Path) -> np.dtype:
        return np.dtype(jnp.dtype(self.dtypes[".".join(param)]))

    def tensor(self, param: layout.Path, layer: int | None) -> np.ndarray:
        return np.asarray(self._ckpt.restore(_item(self.path, param, layer))["value"])

    def place(self, param: layout.Path, layer: int | None, target: jax.ShapeDtypeStruct) -> jax.Array:
        """Restored straight into `target.sharding` (each device reads its slice), then cast to `target.dtype`."""
        stored = jnp.dtype(self.dtypes.get(".".join(param), target.dtype))
        restore_as = jax.ShapeDtypeStruct(target.shape, stored, sharding=target.sharding)
        value = self._ckpt.restore(_item(self.path, param, layer), {"value": restore_as})["value"]
        if value.shape != tuple(target.shape):
            raise ValueError(f"{self.path}: {'.'.join(param)} has shape {value.shape}, config needs {target.shape}")
        return value.astype(target.dtype)

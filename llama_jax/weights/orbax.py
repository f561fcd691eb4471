"""Our own checkpoint format: our parameter layout, saved with Orbax, one item per parameter and layer.

    DST/llama_jax.json                      {"format": "llama-jax-orbax", "version": 2, "config": {...}}
    DST/params/tok_embeddings/              an Orbax `StandardCheckpointer` item: {"value": [V, D]}
    DST/params/layers.attention.wq/00000/   layer 0 of a per-layer parameter: {"value": [D, N, H]}
    ...

Why not one pytree of stacked [L, ...] arrays: a stacked 405B FFN weight alone is ~220 GB. One item
per parameter and layer keeps both directions streaming (the host holds one layer's tensor), and
restoring places each layer straight into its sharded home (`target_sharding` from the abstract
model), so each device reads only its slice, written into the preallocated stacked parameter.
Arrays are in our layout (`layout.py`: wq [D, N, H], w1 [D, F], ...) in the stored dtype.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.weights import layout

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
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        self._ckpt.close()


class OrbaxCheckpoint:
    """Reads our Orbax format: `read(param, layer)` is one parameter (one layer of it) in our layout."""

    fmt = "orbax"

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

    def read(self, param: layout.Path, layer: int | None = None, target=None):
        """numpy (target None), or a jax.Array placed per `target` (a ShapeDtypeStruct with a sharding)."""
        item = _item(self.path, param, layer)
        if target is None:
            return np.asarray(self._ckpt.restore(item)["value"])
        return self._ckpt.restore(item, {"value": target})["value"]


def load_orbax(path, *, dtype, mesh, rules, attention):
    """Restore a `Llama` from our Orbax format straight onto `mesh` (None: one device)."""
    from flax import nnx

    from llama_jax import loading
    from llama_jax.model import Llama
    from sharding import rules as sharding_rules

    ckpt = OrbaxCheckpoint(path)
    ckpt.check()
    dtype = jnp.dtype(dtype)
    config = ckpt.config
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), attention=attention))
    graphdef, state = nnx.split(abstract)
    if mesh is not None and rules is None:
        rules = sharding_rules.DEFAULT_RULES
    flat = dict(nnx.to_flat_state(state))
    for rule in layout.rules_for(config):
        variable = flat[rule.path]
        shape = variable.get_value().shape
        names = variable.get_metadata()["out_sharding"]
        stored = jnp.dtype(ckpt.dtypes.get(".".join(rule.path), dtype))

        def restore(layer, shape, names, rule=rule, stored=stored):
            sharding = loading.target_sharding(names, mesh, rules, shape)
            value = ckpt.read(rule.path, layer, jax.ShapeDtypeStruct(shape, stored, sharding=sharding))
            if value.shape != tuple(shape):
                raise ValueError(f"{path}: {'.'.join(rule.path)} has shape {value.shape}, config needs {shape}")
            return value

        if rule.per_layer:
            stacked = loading._zeros(shape, dtype, loading.target_sharding(names, mesh, rules, shape))
            for i in range(config.n_layers):
                stacked = loading._set_layer(stacked, restore(i, shape[1:], names[1:]), i)
        else:
            stacked = restore(None, shape, names).astype(dtype)
        variable.set_value(stacked)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if mesh is not None:
        model.sharding = sharding_rules.ShardingSpec(mesh, tuple(rules))
    return model

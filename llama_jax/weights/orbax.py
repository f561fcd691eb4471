"""Our own checkpoint format: our parameter layout, saved with Orbax, one item per parameter.

    DST/llama_jax.json            {"format": "llama-jax-orbax", "version": 1, "config": {...}}
    DST/params/layers.attention.wq/   an Orbax `StandardCheckpointer` checkpoint of one array
    ...

Why one Orbax item per parameter rather than one pytree: writing streams (the host holds one
parameter, never the model), and restoring places each parameter straight into its sharded home
(`target_sharding` from the abstract model), so each device reads only its slice. Arrays are in our
layout (`layout.py`: wq [L, D, N, H], w1 [L, D, F], ...), stacked over layers, in the stored dtype.
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


def _item(path: pathlib.Path, param: layout.Path) -> pathlib.Path:
    return (path / PARAMS / ".".join(param)).absolute()


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

    def write(self, param: layout.Path, array: np.ndarray) -> None:
        self._ckpt.save(_item(self.path, param), {"value": array})
        self._ckpt.wait_until_finished()
        self._dtypes[".".join(param)] = np.dtype(array.dtype).name

    def finish(self) -> None:
        # The manifest is written last: a directory without it is never taken for a checkpoint.
        manifest = {"format": FORMAT, "version": 1, "config": self.config.to_dict(), "dtypes": self._dtypes}
        (self.path / MANIFEST).write_text(json.dumps(manifest, indent=2))
        self._ckpt.close()


class OrbaxCheckpoint:
    """Reads our Orbax format: `params()` are our parameter paths, `read(p)` the whole stacked array."""

    fmt = "orbax"

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        manifest = json.loads((self.path / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{self.path / MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        self.config = LlamaConfig.from_dict(manifest["config"], source=str(self.path / MANIFEST))
        self.dtypes = manifest.get("dtypes", {})
        self._ckpt = _checkpointer()

    def check(self) -> None:
        missing = [
            ".".join(r.path)
            for r in layout.rules_for(self.config)
            if not (_item(self.path, r.path) / "_METADATA").exists()
        ]
        if missing:
            raise FileNotFoundError(f"{self.path}: Orbax item(s) missing for parameter(s) {missing}")

    def read(self, param: layout.Path, target=None):
        """The parameter as numpy (target None) or as a jax.Array placed per `target` (a ShapeDtypeStruct)."""
        item = _item(self.path, param)
        if target is None:
            return np.asarray(self._ckpt.restore(item)["value"])
        return self._ckpt.restore(item, {"value": target})["value"]


def load_orbax(path, *, dtype, mesh, rules, attention_impl):
    """Restore a `Llama` from our Orbax format straight onto `mesh` (None: one device)."""
    from flax import nnx

    from llama_jax import loading
    from llama_jax.model import Llama
    from sharding import rules as sharding_rules

    ckpt = OrbaxCheckpoint(path)
    ckpt.check()
    dtype = jnp.dtype(dtype)
    config = ckpt.config
    abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0), attention_impl=attention_impl))
    graphdef, state = nnx.split(abstract)
    if mesh is not None and rules is None:
        rules = sharding_rules.DEFAULT_RULES
    flat = dict(nnx.to_flat_state(state))
    for rule in layout.rules_for(config):
        variable = flat[rule.path]
        shape = variable.get_value().shape
        sharding = loading.target_sharding(variable.get_metadata()["out_sharding"], mesh, rules, shape)
        stored = jnp.dtype(ckpt.dtypes.get(".".join(rule.path), dtype))
        value = ckpt.read(rule.path, jax.ShapeDtypeStruct(shape, stored, sharding=sharding))
        if value.shape != shape:
            raise ValueError(f"{path}: parameter {'.'.join(rule.path)} has shape {value.shape}, config needs {shape}")
        variable.set_value(value.astype(dtype) if value.dtype != dtype else value)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if mesh is not None:
        model.sharding = sharding_rules.ShardingSpec(mesh, tuple(rules))
    return model

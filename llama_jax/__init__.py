"""llama-jax: Meta's Llama 3.1 family in JAX/Flax.

The public surface is small and stable: `load`, `save`, `Llama`, `LlamaConfig`, `KVCache`,
`Tokenizer`, `ChatFormat`, `SamplingParams`, `generate`, `stream`, `score` and the CLI `python -m llama_jax`.
Everything else lives in the subpackage of its layer (model/, text/, weights/, inference/, jobs/,
planning/; docs/ARCHITECTURE.md) and may move.

Each name is imported on first use, so `import llama_jax.sharding` (the generic layer, which imports
nothing of the rest) loads only what it names, and `import llama_jax` starts neither JAX nor its backend.
"""

import importlib
from typing import Any

_EXPORTS = {
    "ChatFormat": "text.chat",
    "GenerationResult": "inference.sampler",
    "KVCache": "model.kv_cache",
    "Llama": "model.model",
    "LlamaConfig": "model.config",
    "RopeScaling": "model.config",
    "SamplingParams": "inference.sampling",
    "Tokenizer": "text.tokenizer",
    "find_tokenizer": "text.tokenizer",
    "generate": "inference.sampler",
    "load": "weights.loading",
    "open_checkpoint": "weights.loading",
    "save": "jobs.convert",
    "score": "inference.sampler",
    "stream": "inference.sampler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name from its module, or a layer's package (`llama_jax.planning` after `import llama_jax`)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

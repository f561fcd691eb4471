"""llama-jax: Meta's Llama 3.1 family in JAX/Flax.

The public surface is small and stable: `load`, `Llama`, `LlamaConfig`, `KVCache` (and, as they
land, `generate`, `Tokenizer`, `ChatFormat`, the CLI `python -m llama_jax`). Everything else may move.
"""

from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.kv_cache import KVCache
from llama_jax.loading import load, open_checkpoint
from llama_jax.model import Llama

__all__ = ["KVCache", "Llama", "LlamaConfig", "RopeScaling", "load", "open_checkpoint"]

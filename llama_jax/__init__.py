"""llama-jax: Meta's Llama 3.1 family in JAX/Flax.

The public surface is small and stable: `load`, `Llama`, `LlamaConfig`, `KVCache`, `Tokenizer`,
`ChatFormat` (and, as it lands, `generate` and the CLI `python -m llama_jax`). Everything else may move.
"""

from llama_jax.chat import ChatFormat
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.kv_cache import KVCache
from llama_jax.loading import load, open_checkpoint
from llama_jax.model import Llama
from llama_jax.tokenizer import Tokenizer, find_tokenizer

__all__ = ["ChatFormat", "KVCache", "Llama", "LlamaConfig", "RopeScaling", "Tokenizer", "find_tokenizer", "load", "open_checkpoint"]

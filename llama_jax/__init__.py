"""llama-jax: Meta's Llama 3.1 family in JAX/Flax.

The public surface is small and stable: `load`, `save`, `Llama`, `LlamaConfig`, `KVCache`,
`Tokenizer`, `ChatFormat`, `SamplingParams`, `generate`, `stream` and the CLI `python -m llama_jax`.
Everything else may move.
"""

from llama_jax.chat import ChatFormat
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.kv_cache import KVCache
from llama_jax.loading import load, open_checkpoint
from llama_jax.model import Llama
from llama_jax.sampler import GenerationResult, generate, stream
from llama_jax.sampling import SamplingParams
from llama_jax.tokenizer import Tokenizer, find_tokenizer

__all__ = [
    "ChatFormat",
    "GenerationResult",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "SamplingParams",
    "Tokenizer",
    "find_tokenizer",
    "generate",
    "load",
    "open_checkpoint",
    "save",
    "stream",
]


def __getattr__(name: str):
    # `save` is imported on first use, so that importing the package does not import `llama_jax.convert`:
    # `python -m llama_jax.convert` then runs it fresh, without runpy's "found in sys.modules" warning.
    if name == "save":
        from llama_jax.convert import save

        return save
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")

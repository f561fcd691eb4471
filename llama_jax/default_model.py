"""The embedded default: a small Llama-3.1-shaped model with RANDOM weights, and the real tokenizer.

It exists so the CLI, examples and tests run with no checkpoint at all. Its text is noise: the
weights are drawn from a fixed seed, not trained. The shape is Llama 3.1's in miniature: the full
128,256-token vocabulary, llama3 RoPE scaling, grouped-query attention (8 query heads, 2 kv heads),
tied embeddings, Meta's FFN width rule; about 35.8M parameters, 32.8M of them the embedding.

The tokenizer is Meta's own `tokenizer.model` shipped inside the `llama_models` package, when that
package is installed.
"""

from __future__ import annotations

import pathlib
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.config import LLAMA3_VOCAB_SIZE, LlamaConfig, RopeScaling, ffn_hidden_dim
from llama_jax.model import Llama

__all__ = ["DEFAULT_CONFIG", "RANDOM_WEIGHTS_NOTICE", "default_model", "default_tokenizer", "tokenizer_path"]

DEFAULT_CONFIG = LlamaConfig(
    vocab_size=LLAMA3_VOCAB_SIZE,
    dim=256,
    n_layers=4,
    n_heads=8,
    n_kv_heads=2,
    ffn_dim=ffn_hidden_dim(256, None, 256),  # 768, as Meta derives it (multiple_of=256)
    norm_eps=1e-5,
    rope_theta=500_000.0,
    rope_scaling=RopeScaling(factor=8.0),
    max_seq_len=131_072,
    tie_embeddings=True,
)

RANDOM_WEIGHTS_NOTICE = (
    "NOTICE: no --checkpoint given, running the embedded default model. Its weights are RANDOM "
    "(seeded, untrained): the output is meaningless text. Pass --checkpoint DIR for a real Llama."
)

WEIGHT_STD = 0.02


def default_model(
    *, seed: int = 0, dtype: str | jnp.dtype = "float32", warn: bool = True, attention: str = "auto"
) -> Llama:
    """The default `Llama` with random weights (N(0, 0.02²) matrices, unit norms) from `seed`.

    attention: the attention backend (`llama_jax.attention.BACKENDS`).
    Built from numpy's generator (about 1 s) rather than module initialisation, which draws
    the 32.8M embedding values several times slower on CPU.
    """
    if warn:
        warnings.warn(RANDOM_WEIGHTS_NOTICE, stacklevel=2)
    dtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(lambda: Llama(DEFAULT_CONFIG, dtype=dtype, rngs=nnx.Rngs(0), attention=attention))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    flat = dict(nnx.to_flat_state(state))
    for path in sorted(flat):  # a fixed order: the same seed gives the same weights
        variable = flat[path]
        shape = variable.get_value().shape
        if variable.get_metadata()["out_sharding"][-1] == "norm":
            value = np.ones(shape, np.float32)
        else:
            value = rng.standard_normal(shape, dtype=np.float32)
            value *= np.float32(WEIGHT_STD)
        variable.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tokenizer_path() -> pathlib.Path | None:
    """Meta's Llama 3 `tokenizer.model` from the installed `llama_models` package, if any."""
    try:
        import llama_models
    except ImportError:
        return None
    path = pathlib.Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    return path if path.is_file() else None


def default_tokenizer():
    """The real Llama 3 tokenizer (from `llama_models`), or None when that package is missing."""
    path = tokenizer_path()
    if path is None:
        return None
    from llama_jax.tokenizer import Tokenizer

    return Tokenizer.from_file(path)

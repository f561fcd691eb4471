"""Llama 3.2 1B: tied embeddings, head_dim 64, rope factor 32 (HF's value)."""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama3_2_1b")

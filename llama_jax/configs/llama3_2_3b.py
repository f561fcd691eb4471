"""Llama 3.2 3B: tied embeddings, rope factor 32 (HF's value)."""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama3_2_3b")

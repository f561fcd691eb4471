"""Llama 3.1 8B (and Instruct)."""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama3_1_8b")

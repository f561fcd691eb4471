"""Llama 3.1 405B (and Instruct; the bf16-mp8 and FP8 releases)."""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama3_1_405b")

"""Llama 2 7B: multi-head attention, 32,000-token sentencepiece vocabulary, no rope scaling."""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama2_7b")

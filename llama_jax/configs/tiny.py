"""A tiny Llama-3.1-shaped model for tests and examples (GQA, llama3 rope scaling, small vocabulary)."""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("tiny")

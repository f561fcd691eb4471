"""Llama Guard 3 8B: a Llama 3.1 8B fine-tune that classifies prompts and responses (`llama_jax.jobs.guard`).

`model` holds Meta's params.json keys as llama_models/sku_list.py lists them for Llama-Guard-3-8B (and the
INT8 variant): the 8B shape, with `use_scaled_rope=False` (unlike Llama 3.1 8B). Run it with
`python -m llama_jax guard --checkpoint Llama-Guard-3-8B --message "..."`.
"""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama_guard3_8b")

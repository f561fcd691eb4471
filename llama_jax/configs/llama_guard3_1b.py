"""Llama Guard 3 1B: a Llama 3.2 1B fine-tune (the same shape: 16 layers, FFN 8192, tied embeddings).

`model` holds Meta's params.json keys as llama_models/sku_list.py lists them for Llama-Guard-3-1B. It is
not pruned: the pruned model is Llama-Guard-3-1B-INT4 (12 layers, FFN 6400, 4-bit, an ExecuTorch .pte
file with no loadable weights here). It was not trained for S14 (Code Interpreter Abuse): pass
`excluded=["S14"]` to `guard.classify`, as its own chat template lists S1-S13.
"""

from llama_jax.model.config import model_preset


def get_config():
    return model_preset("llama_guard3_1b")

"""A Llama's state: checkpoints read, written and placed on a mesh, FP8 and LoRA weights."""

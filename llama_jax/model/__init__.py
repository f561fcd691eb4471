"""The model: the Llama transformer and what it is made of (config, attention, caches, projections)."""

"""Generic sharding: meshes, rules tables, activation constraints, shard_map ops, jax.distributed start-up.

Imports nothing else of llama_jax: it knows logical axis names, not which array carries them.
"""

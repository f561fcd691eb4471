"""llama-jax: Meta's Llama 3.1 family in JAX/Flax."""

"""Inference: sampling, the two jitted programs, generate / stream and the batching engine."""

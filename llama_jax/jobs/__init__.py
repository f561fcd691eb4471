"""The jobs: batch, rejection sampling, Llama Guard, convert and training."""

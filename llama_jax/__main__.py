"""`python -m llama_jax COMMAND ...`: see `llama_jax/cli.py`."""

import sys

from llama_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())

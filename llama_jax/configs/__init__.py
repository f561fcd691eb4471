"""The presets: a `get_config()` per model size and per job, found by name by `--config NAME`."""

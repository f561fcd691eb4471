"""Side-by-side measurements against transformers; each script prints JSON (results under benchmarks/results/)."""

"""Side-by-side measurements against transformers; each script prints JSON (results under benchmarks/results/)."""

import json
import pathlib


def report(result: dict, out: pathlib.Path | None) -> dict:
    """Print `result` as JSON and, given `out`, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result

"""Side-by-side measurements against transformers; each script prints JSON (results under benchmarks/results/)."""

import json
import pathlib


def layer_matmul_weights(config) -> int:
    """Weights one layer multiplies each token by (wq, wk, wv, wo, w1, w2, w3): 2 FLOPs each per token."""
    c = config
    attention = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
    return attention + 3 * c.dim * c.ffn_dim


def report(result: dict, out: pathlib.Path | None) -> dict:
    """Print `result` as JSON and, given `out`, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


def main_in_tempdir(run, doc: str) -> None:
    """A benchmark's command line: `--out FILE`; `run(directory)` gets a temporary directory for its checkpoints."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        report(run(pathlib.Path(d)), args.out)

"""Each benchmark's headline as a PNG, drawn from its results JSON: `python -m benchmarks.figures`.

Reads benchmarks/results/*.json and writes docs/figures/<benchmark>.png, the figures the README's
"Measured" table links. A results file that does not exist yet is skipped with a note, so the command
runs on any checkout; rerun it after a benchmark rewrites its JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
DPI = 100
OURS, THEIRS, OTHER = "#1f77b4", "#ff7f0e", "#9e9e9e"


def _bars(ax, labels, series, ylabel, title, log=False):
    """Grouped bars: `series` maps a legend name to (values, colour), one value per label."""
    width = 0.8 / len(series)
    for i, (name, (values, colour)) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name, color=colour)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def decode(data, fig):
    runs = [(shape, b, r) for shape, s in data["shapes"].items() for b, r in s.items() if b.startswith("batch_")]
    labels = [shape.replace("_", "\n") + f"\nB={b.removeprefix('batch_')}" for shape, b, _ in runs]
    tok = [r["decode_tokens_per_s"] for _, _, r in runs]
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    series = {"llama-jax": ([t["llama_jax"] for t in tok], OURS)}
    series["transformers"] = ([t["transformers"] for t in tok], THEIRS)
    series["transformers static + compile"] = ([t["transformers_compiled"] for t in tok], OTHER)
    _bars(left, labels, series, "decode tokens/s", "decode vs transformers (same weights, same run)", log=True)
    roofline = [100 * r["llama_jax_roofline_fraction"] for _, _, r in runs]
    right.bar(range(len(runs)), roofline, color=OURS)
    right.axhline(100, color="black", lw=0.8, ls="--")
    right.set_xticks(range(len(runs)), labels, fontsize=7)
    right.set_ylabel("% of the memory-bandwidth roofline")
    right.set_title(f"llama-jax decode, copy bandwidth {data['memory_bandwidth_GBps']['used']} GB/s", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Decode, {data['device']} ({data['cpu_count']} cores), fp32")


def long_context(data, fig):
    sides = {"llama_jax": ("llama-jax (blockwise)", OURS), "transformers_sdpa": ("transformers SDPA", THEIRS)}
    prefill, memory = fig.subplots(1, 2)
    for side, (name, colour) in sides.items():
        rows = sorted((r for r in data["results"] if r["side"] == side), key=lambda r: r["length"])
        lengths = [r["length"] for r in rows]
        prefill.plot(lengths, [r["prefill_s"] for r in rows], "o-", color=colour, label=name)
        memory.plot(lengths, [r["peak_rss_gib"] for r in rows], "o-", color=colour, label=name)
    for ax, ylabel in ((prefill, "prefill seconds"), (memory, "peak resident memory, GiB")):
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    prefill.set_title("prefill time", fontsize=10)
    memory.set_title("process peak RSS", fontsize=10)
    memory.set_ylim(bottom=0)
    fig.suptitle(f"Long context: {data['model']}", fontsize=9)


def engine(data, fig):
    workloads = {"stop": "sampled stop tokens", "prefix": "1,000-token shared system prompt"}
    runs = {
        "engine": ("llama-jax engine", OURS),
        "engine_noshare": ("engine, no prefix sharing", "#7fb3e0"),
        "static": ("static batcher", OTHER),
        "transformers_generate_batch": ("transformers generate_batch", THEIRS),
    }
    ax = fig.subplots()
    labels = [f"{workloads[w]}\n{data[w]['requests']} requests" for w in workloads]
    series = {name: ([data[w].get(key, {}).get("seconds", 0) for w in workloads], c) for key, (name, c) in runs.items()}
    _bars(ax, labels, series, "wall seconds (lower is better)", f"Continuous batching, {data['batch']} slots")


def batch(data, fig):
    ours, theirs = data["llama_jax_batch"], data["transformers_one_by_one"]
    ax = fig.subplots()
    names = ["llama-jax batch job\n(warm)", "llama-jax batch job\n(cold, compiles)", "transformers\none by one"]
    values = [ours["requests_per_s"], ours["cold_requests_per_s"], theirs["requests_per_s"]]
    ax.bar(names, values, color=[OURS, "#7fb3e0", THEIRS])
    ax.set_ylabel("requests/s")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Batch job, {data['job']['requests']} chat/text requests, {data['job']['max_new_tokens']} new tokens")


def constrained(data, fig):
    sides = data["engine"]
    ax = fig.subplots()
    names = {
        "unconstrained": ("unconstrained", THEIRS),
        "one_step_bursts": ("unconstrained,\none-step bursts", "#bbbbbb"),
    }
    names |= {"mixed": ("half JSON schema", "#7fb3e0"), "json_schema": ("all JSON schema", OURS)}
    ax.bar(
        [n for n, _ in names.values()], [sides[k]["tokens_per_s"] for k in names], color=[c for _, c in names.values()]
    )
    ax.set_ylabel("decode tokens/s")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Constrained decoding in the engine, batch {sides['batch']}, default model, {data['device']}")


def train(data, fig):
    tok = data["tokens_per_s"]
    ax = fig.subplots()
    names = {"transformers": ("transformers + AdamW", THEIRS), "llama_jax": ("llama-jax", OURS)}
    names["llama_jax_remat"] = ("llama-jax, remat", "#7fb3e0")
    ax.bar([n for n, _ in names.values()], [tok[k] for k in names], color=[c for _, c in names.values()])
    ax.set_ylabel("training tokens/s")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"One full fine-tuning step, batch {data['batch']} x {data['seq_len']}, {data['machine']}")


def meta_load_memory(data, fig):
    ax = fig.subplots()
    mib = 2**20
    names = ["each device reads its slice", "shards merged first"]
    ax.bar(names, [data[k]["peak_host_bytes"] / mib for k in ("slices", "whole")], color=[OURS, OTHER])
    ax.axhline(data["largest_device_slice_bytes"] / mib, color=OURS, ls="--", lw=0.8, label="one device slice")
    ax.axhline(data["largest_tensor_bytes"] / mib, color="black", ls="--", lw=0.8, label="the largest tensor")
    ax.set_ylabel("peak host buffers, MiB")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Loading {data['checkpoint']}\n{data['mesh']}", fontsize=9)


def meta_write_memory(data, fig):
    ax = fig.subplots()
    mb = 1e6
    names = ["model", "largest tensor", "growth writing MP1", "growth writing MP2"]
    values = [data["model_bytes"], data["largest_tensor_bytes"], data["mp1"]["anon_growth_bytes"]]
    values.append(data["mp2"]["anon_growth_bytes"])
    ax.bar(names, [v / mb for v in values], color=[OTHER, OTHER, OURS, OURS])
    ax.set_ylabel("MB (anonymous memory for the growth)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Writing a Meta checkpoint from HF: memory grows by one tensor", fontsize=10)


def compiled_targets(data, fig):
    """Entries that failed to compile (an `error`) or carry no efficiency get a note in place of a bar."""

    def order(key):
        size, dtype, target, program, batch, context = key.split("/")
        missing = data[key].get("efficiency") is None
        return missing, program, int(context[:-1]), int(size.removesuffix("b")), target, dtype, int(batch)

    keys = sorted(data, key=order)
    ax = fig.subplots()
    colours = {"decode": OURS, "burst": "#7fb3e0"}
    for y, key in enumerate(keys):
        entry = data[key]
        if entry.get("efficiency") is not None:
            ax.barh(y, 100 * entry["efficiency"], color=colours.get(entry["program"], THEIRS))
        else:
            note = entry["error"].split(":")[1].strip() if "error" in entry else "no efficiency recorded"
            ax.text(1, y, note, va="center", fontsize=6, color="#c62828" if "error" in entry else OTHER)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_ylim(len(keys) - 0.5, -0.5)
    ax.set_xlim(0, 110)
    ax.axvline(100, color="black", lw=0.8, ls="--")
    ax.set_xlabel("% compiled efficiency: bytes the program must move / bytes the compiled program moves")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Compiled programs per target (size/dtype/target/program/batch/context)", fontsize=10)


# name -> (results file, drawing, figure size in inches); a size may depend on the data.
DRAWINGS = {
    "decode_cpu": ("decode_cpu.json", decode, lambda d: (14, 5)),
    "long_context_cpu": ("long_context_cpu.json", long_context, lambda d: (10, 4)),
    "engine_cpu": ("engine_cpu.json", engine, lambda d: (8, 4.5)),
    "batch_cpu": ("batch_cpu.json", batch, lambda d: (7, 4)),
    "train_cpu": ("train_cpu.json", train, lambda d: (7, 4)),
    "constrained_cpu": ("constrained_cpu.json", constrained, lambda d: (8, 4)),
    "meta_load_memory_cpu": ("meta_load_memory_cpu.json", meta_load_memory, lambda d: (6, 4)),
    "meta_write_memory_cpu": ("meta_write_memory_cpu.json", meta_write_memory, lambda d: (7, 4)),
    "compiled_targets": ("compiled_targets.json", compiled_targets, lambda d: (10, 1.5 + 0.17 * len(d))),
}


def draw_all(results: pathlib.Path = RESULTS, out: pathlib.Path = FIGURES) -> list[pathlib.Path]:
    """Draw every figure whose results file exists; returns the PNGs written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (source, draw, size) in DRAWINGS.items():
        path = results / source
        if not path.exists():
            print(f"skipped {name}: {path} does not exist yet")
            continue
        data = json.loads(path.read_text())
        fig = plt.figure(figsize=size(data), layout="constrained")
        try:
            draw(data, fig)
            fig.savefig(out / f"{name}.png", dpi=DPI)
        finally:
            plt.close(fig)
        written.append(out / f"{name}.png")
        print(f"wrote {out / f'{name}.png'} from {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS, help="folder of the results JSON")
    parser.add_argument("--out", type=pathlib.Path, default=FIGURES, help="folder the PNGs are written to")
    args = parser.parse_args(argv)
    draw_all(args.results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The program report: every program of the project compiled for TPUs and H100s on this CPU, and read.

    JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m llama_jax.planning.program_report --fresh \\
        [--json benchmarks/results/compiled_targets.json] [--docs docs/TARGETS.md] [--models 8b,70b] [--limit N]

Per program (`target_programs.Setup`), per target (`targets`), per cache context (`CONTEXTS`: 8K for
every program, 128K for the decode programs), on the planner's abstract weights:
- minimum: the bytes one decode step must read per device, every weight but the embedding table and
  the whole filled KV cache (decode programs only: `Setup.minimum_step_bytes`);
- moved: minimum + the HBM copies, transposes, slices and gathers one step of the compiled program
  makes (`compiled.Report.moved`); efficiency = minimum / moved, 1.0 when the program only reads;
- memory: arguments + outputs - aliased + temporaries per device, against the device's HBM;
- dots: how many run f8 x f8 after compilation, how many convert an FP8 operand up first;
- attention: the fused-attention custom calls after compilation (`__cudnn$fmha*`, TPU `tpu_custom_call`,
  the Pallas Triton `__gpu$xla.gpu.triton`: the engine's burst on one device decodes with a paged kernel);
- compile time, and libtpu's own `bytes accessed` as it reports it (a `while` body counted once).

A decode whose layers run unrolled (`generate`'s loop and the engine's burst where the per-layer weights
fit) compiles in a time that grows with depth: for a GPU it is compiled at 3 and 5 layers and read at
full depth from those two (`llama_jax.planning.depth`); TPU programs, and every program that scans its layers,
are compiled whole. Each row says which (`compiled_layers`); `--full-depth` compiles them all whole.

Rows are written to the JSON as they finish and skipped when already there, so a regeneration can stop
and go on (without `--fresh`, which starts the table anew); `--docs` rewrites the table between the
markers in that file from the JSON alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import pathlib
import sys
import time
from typing import Any

from llama_jax.planning import compiled, depth, plan_target, targets
from llama_jax.planning.plan_report import human

CONTEXT = 8192  # every program's cache
LONG_CONTEXT = 131_072  # the decode programs' second cache (Llama 3.1's context)
CONTEXTS = (CONTEXT, LONG_CONTEXT)
CONFIGS = {"8b": "llama3_1_8b", "70b": "llama3_1_70b", "405b": "llama3_1_405b"}
# Where each model is compiled: the targets whose HBM can hold it (bf16, or the FP8 release layout).
MODEL_TARGETS = {
    "8b": tuple(targets.all_targets()),
    "70b": ("v5e-8", "v5p-8", "v5p-16", "v6e-8", "h100x8", "h200x8"),
    "405b": ("v5p-16", "v5p-32", "h100x8", "h200x8"),
}
# (program, batch or slots): generate's prefill (one chunk; chunked), its decode loop, the engine's
# decode burst and chunk prefill, one training step (`TRAIN_SEQ` tokens per row).
PROGRAMS = (
    ("decode", 1),
    ("decode", 8),
    ("decode", 32),
    ("burst", 8),
    ("burst", 32),
    ("prefill", 1),
    ("prefill_chunked", 1),
    ("chunk_prefill", 8),
    ("train", 8),
)
TRAIN_SEQ = 2048
DECODES = ("decode", "burst")
BEGIN, END = "<!-- program-report:begin -->", "<!-- program-report:end -->"


def row_key(model: str, weights: str, target: str, program: str, batch: int, context: int = CONTEXT) -> str:
    return f"{model}/{weights}/{target}/{program}/{batch}/{context // 1024}k"


def rows_to_run(models=("8b", "70b", "405b")) -> list[tuple[str, str, str, str, int, int]]:
    """(model, weights, target, program, batch, context), the headline rows first, the 128K decodes last."""
    first = [
        ("8b", "bf16", "v5p-2", "decode", 1),
        ("8b", "bf16", "v5p-2", "decode", 8),
        ("8b", "bf16", "h100x1", "decode", 1),
        ("8b", "bf16", "h100x1", "decode", 8),
        ("8b", "bf16", "v6e-4", "decode", 8),
        ("8b", "bf16", "v5e-4", "decode", 8),
        ("405b", "fp8", "h100x8", "decode", 8),
        ("8b", "fp8", "h100x1", "decode", 1),
        ("8b", "bf16", "v5p-2", "prefill", 1),
        ("8b", "bf16", "h100x1", "prefill", 1),
    ]
    rest = []
    for model in models:
        for target in MODEL_TARGETS[model]:
            weight_kinds = ["bf16"]
            if target.startswith(("h100", "h200")):  # FP8 GEMMs run on Hopper
                weight_kinds.append("fp8")
            if model == "405b" and target == "h100x8":
                weight_kinds = ["fp8"]  # 405B bf16 does not fit 8 x 80 GB
            for weights in weight_kinds:
                # Training runs on bf16 weights (float32 master copies): no FP8 training step.
                rest += [(model, weights, target, p, b) for p, b in PROGRAMS if weights == "bf16" or p != "train"]
    # Program by program, so that a regeneration cut short has the decode rows of every model and target.
    priority = ("decode/8", "decode/1", "burst/8", "prefill/1", "decode/32", "burst/32")
    rest.sort(key=lambda r: priority.index(f"{r[3]}/{r[4]}") if f"{r[3]}/{r[4]}" in priority else len(priority))
    short = [r for r in first if r[0] in models] + [r for r in rest if r not in first]
    long = [r for r in short if r[3] in DECODES]
    return [(*r, CONTEXT) for r in short] + [(*r, LONG_CONTEXT) for r in long]


@functools.cache
def _setup(model: str, weights: str, target: str, layers: int | None = None, training: bool = False):
    """The model's abstract weights on the target's mesh for inference (or `training`), at its own depth or
    at `layers` layers (held as the model at its own depth holds them: stacked or `Unstacked`)."""
    from llama_jax.model.config import model_config_from_file
    from llama_jax.planning.target_programs import Setup

    config = model_config_from_file(CONFIGS[model])
    if layers is None:
        return Setup.create(config, targets.get(target), weights, training=training)
    by_layer = _setup(model, weights, target, training=training).by_layer
    shallow = dataclasses.replace(config, n_layers=layers)
    return Setup.create(shallow, targets.get(target), weights, by_layer=by_layer, training=training)


def _lowered(setup, program: str, batch: int, context: int = CONTEXT, stacked: bool | None = None):
    if program == "decode":
        return setup.decode_loop(batch, context, stacked)
    if program == "burst":
        return setup.burst(batch, context, stacked=stacked)
    if program == "prefill":
        return setup.prefill(batch, 2048, CONTEXT)
    if program == "prefill_chunked":
        return setup.prefill(batch, CONTEXT // 2, CONTEXT)
    if program == "chunk_prefill":
        return setup.chunk_prefill(batch, CONTEXT)
    return setup.train_step(batch, TRAIN_SEQ)


def compiled_layers(model: str, weights: str, target: str, program: str, full_depth: bool = False) -> tuple:
    """The depths a row is compiled at: `depth.DEPTHS` for a GPU decode whose layers run unrolled (its
    compile time grows with depth), else the model's own. TPU programs are compiled whole: libtpu
    re-lays out a decode's cache or not depending on the whole program (docs/TARGETS.md)."""
    setup = _setup(model, weights, target)
    unrolled = program in DECODES and not setup.scans_layers()
    if unrolled and setup.target.platform == "cuda" and not full_depth:
        return depth.DEPTHS
    return (setup.config.n_layers,)


def run_row(
    model: str, weights: str, target: str, program: str, batch: int, context: int = CONTEXT, full_depth: bool = False
):
    """Compile one program and read it: the row of the report. A GPU decode whose layers run unrolled is
    compiled at `depth.DEPTHS` layers and extrapolated (`full_depth`: compiled as deep as the model)."""
    from llama_jax.planning import target_programs

    setup = _setup(model, weights, target, training=program == "train")
    layers = setup.config.n_layers
    # Loops of unknown trip count inside a step (attention over key blocks) run over the whole filled context.
    blocks = context // (target_programs.PAGE_SIZE * target_programs.BLOCK_PAGES)
    loops = {"step_loop": program in DECODES, "dynamic_trips": blocks}
    start, cpu = time.perf_counter(), time.process_time()
    if compiled_layers(model, weights, target, program, full_depth) == depth.DEPTHS:
        shallow = []
        for d in depth.DEPTHS:
            lowered = _lowered(_setup(model, weights, target, d), program, batch, context, stacked=False)
            shallow.append(depth.reading(compiled.compile_and_read(lowered, **loops), d, layers))
        reading = depth.extrapolate(*shallow)
    else:
        reading = depth.reading(compiled.compile_and_read(_lowered(setup, program, batch, context), **loops), layers)
    seconds = round(time.perf_counter() - start, 1), round(time.process_time() - cpu, 1)
    return summarize(setup, program, batch, context, reading, *seconds)


def summarize(
    setup, program: str, batch: int, context: int, reading: depth.Reading, seconds: float, cpu: float
) -> dict[str, Any]:
    target = setup.target
    minimum = setup.minimum_step_bytes(batch * context) if program in DECODES else None
    moved = None if minimum is None else minimum + reading.moved
    largest = reading.largest_moves(3)
    return {
        "target": target.name,
        "device": target.devices()[0].device_kind,
        "devices": target.n_devices,
        "mesh": dict(setup.mesh.shape),
        "layers": setup.config.n_layers,
        "compiled_layers": list(reading.compiled_layers),  # two depths: extrapolated (`llama_jax.planning.depth`)
        "program": program,
        "batch": batch,
        "context": context,
        "minimum_bytes": minimum,
        "copy_bytes": reading.moved,
        "moved_bytes": moved,
        "efficiency": None if moved is None else round(minimum / moved, 3),
        "largest_copies": [f"{kind} {human(n // 2)} x{times}" for kind, n, times in largest if n > 1 << 20],
        "memory": reading.memory,
        "hbm_bytes": target.hbm_bytes,
        "fits": reading.memory["peak"] <= target.hbm_bytes,
        "dots": reading.dots,
        "fp8_dots": reading.fp8_dots,
        "fp8_upcast_dots": reading.fp8_upcast_dots,
        "attention_kernels": reading.attention_kernels,
        "compile_seconds": seconds,  # wall clock, lowering included
        "compile_cpu_seconds": cpu,  # every thread's, less sensitive to a shared machine's load
        "libtpu_bytes_accessed": reading.cost_bytes_accessed,
    }


# ---- output -------------------------------------------------------------------------------------


def _gb(x) -> str:
    return "—" if x is None else f"{x / 1e9:.1f}"


def markdown(results: dict[str, dict]) -> str:
    lines = [
        "| model | weights | target | program | batch | context | minimum GB | moved GB | efficiency "
        "| largest copies | peak / HBM GB | fits | fp8 dots (upcast) | attention | compiled layers | compile CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(results, key=_order):
        r = results[key]
        model, weights, target, program, batch, context = key.split("/")
        row = f"| {model} | {weights} | {target} | {program} | {batch} | {context.upper()} |"
        if "error" in r:
            if "RESOURCE_EXHAUSTED" in r["error"]:  # libtpu refuses what cannot fit its HBM
                need = plan_target.refused(r["error"], 0)["peak"]
                hbm = targets.get(target).hbm_bytes
                lines.append(f"{row} | | | compiler refused | {_gb(need)} / {_gb(hbm)} | **no** | | | {_layers(r)} | |")
            else:
                lines.append(f"{row} | | | | {r['error'][:90]} | | | | | {_layers(r)} | |")
            continue
        fp8 = f"{r['fp8_dots']} ({r['fp8_upcast_dots']})" if weights == "fp8" else "—"
        attention = ", ".join(f"{k} x{n}" for k, n in r["attention_kernels"].items()) or "—"
        eff = "—" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        lines.append(
            f"{row} {_gb(r['minimum_bytes'])} | {_gb(r['moved_bytes'])} | {eff} "
            f"| {'; '.join(r['largest_copies']) or '—'} "
            f"| {_gb(r['memory']['peak'])} / {_gb(r['hbm_bytes'])} | {'yes' if r['fits'] else '**no**'} "
            f"| {fp8} | {attention} | {_layers(r)} | {r.get('compile_cpu_seconds', '—')} |"
        )
    return "\n".join(lines)


def _layers(row: dict) -> str:
    """The depths a row was compiled at: "3, 5 → 32" where it is extrapolated (`llama_jax.planning.depth`)."""
    depths = row.get("compiled_layers", [row.get("layers", "")])
    return ", ".join(map(str, depths)) + (f" → {row['layers']}" if len(depths) > 1 else "")


def _order(key: str):
    model, weights, target, program, batch, context = key.split("/")
    programs = [p for p, _ in PROGRAMS]
    return (
        int(context[:-1]),
        list(CONFIGS).index(model),
        weights,
        list(targets.all_targets()).index(target),
        programs.index(program),
        int(batch),
    )


def write_docs(results: dict[str, dict], path: pathlib.Path) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers to write the table between")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{BEGIN}\n{markdown(results)}\n{END}{tail}")


def agreement(reference: dict[str, dict], results: dict[str, dict]) -> list[str]:
    """Rows extrapolated in `results` against the same rows compiled at full depth in `reference`:
    efficiency, bytes moved per step and peak memory, the extrapolated value first."""
    lines = []
    for key in sorted(set(reference) & set(results), key=_order):
        full, guess = reference[key], results[key]
        if "error" in full or "error" in guess or len(guess.get("compiled_layers", [])) < 2:
            continue
        if len(full.get("compiled_layers", [full["layers"]])) > 1:
            continue

        def rel(a, b):
            return "—" if a is None or b is None else f"{(a - b) / b:+.1%}" if b else f"{a} / {b}"

        moved = rel(guess["moved_bytes"], full["moved_bytes"])
        peak = rel(guess["memory"]["peak"], full["memory"]["peak"])
        lines.append(
            f"{key}: efficiency {guess['efficiency']} vs {full['efficiency']}, moved {moved}, peak {peak}, "
            f"compile {guess['compile_seconds']} s vs {full['compile_seconds']} s (wall)"
        )
    return lines


def _one(job) -> tuple[str, dict]:
    """(key, row) of one row of the report; a program the target's compiler refuses is a result too."""
    row, full_depth = job
    cpu = time.process_time()
    try:
        return row_key(*row), run_row(*row, full_depth=full_depth)
    except Exception as e:
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        layers = list(compiled_layers(*row[:4], full_depth))
        failed = {"error": error, "layers": _setup(*row[:3]).config.n_layers, "compiled_layers": layers}
        return row_key(*row), {**failed, "compile_cpu_seconds": round(time.process_time() - cpu, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="benchmarks/results/compiled_targets.json")
    p.add_argument("--docs", default="docs/TARGETS.md", help="rewrite the table in this file (empty: don't)")
    p.add_argument("--models", default="8b,70b,405b")
    p.add_argument("--limit", type=int, default=None, help="compile at most this many new rows")
    p.add_argument("--programs", default=None, help="only these programs, e.g. train,decode")
    p.add_argument("--fresh", action="store_true", help="start a new table (the programs changed) instead of resuming")
    p.add_argument("--full-depth", action="store_true", help="compile unrolled decodes at full depth (slow: checks)")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (at most the cores)")
    p.add_argument("--compare", default=None, help="check extrapolated rows against the full-depth ones of this JSON")
    args = p.parse_args(argv)
    models = tuple(args.models.split(","))
    unknown = [m for m in models if m not in CONFIGS]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; known: {', '.join(CONFIGS)}")
    out = pathlib.Path(args.json)
    results = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    programs = args.programs.split(",") if args.programs else [p for p, _ in PROGRAMS]
    todo = [r for r in rows_to_run(models) if row_key(*r) not in results and r[3] in programs][: args.limit]
    start, cpu = time.perf_counter(), 0.0
    jobs = [(row, args.full_depth) for row in todo]
    with multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else contextlib.nullcontext() as pool:
        for i, (key, result) in enumerate(pool.imap_unordered(_one, jobs) if pool else map(_one, jobs)):
            results[key] = result
            out.write_text(json.dumps(results, indent=1) + "\n")
            cpu += result["compile_cpu_seconds"]
            took = f"{time.perf_counter() - start:.0f} s, {cpu:.0f} s CPU"
            print(f"[{i + 1}/{len(todo)}, {took}] {key}", file=sys.stderr, flush=True)
    print(f"{len(todo)} rows compiled in {time.perf_counter() - start:.0f} s, {cpu:.0f} s CPU", file=sys.stderr)
    if args.docs:
        write_docs(results, pathlib.Path(args.docs))
    if args.compare:
        print("\n".join(agreement(json.loads(pathlib.Path(args.compare).read_text()), results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

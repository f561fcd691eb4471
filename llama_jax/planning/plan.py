"""The memory planner: will this model, on this mesh, with this batch and context, fit?

    python -m llama_jax plan --config llama3_1_405b --preset h100x16 --mesh fsdp=2,tensor=8 \
        --batch 8 --context 131072 [--prompt N] [--chunk 2048] [--attention blockwise] [--weight-dtype bfloat16|fp8]
    python -m llama_jax plan --report docs/SHARDING.md     # regenerate the tables in the docs

What it prints, and the docs' tables, are written by `llama_jax.planning.plan_report`.

It sits on top of both layers: meshes and rules from `llama_jax/sharding/`, the abstract Llama and its cache from
`llama_jax.weights.placement`.

It creates as many virtual CPU devices as the mesh has (before jax's backend starts), builds the
model and KV cache as sharded `jax.ShapeDtypeStruct`s (no weights exist anywhere), lowers and
compiles one prefill of a `--prompt`-token prompt (default: the whole context), run as the model runs it
(chunks of `--chunk` tokens under `lax.scan`, through the cache, with the `--attention` backend), and one
decode step, and reads the per-device bytes from
`compiled.memory_analysis()`: arguments (weights, cache, tokens), outputs, aliased (the donated
cache) and temporaries. Layers are scanned, so the program has one layer body whatever the depth
and even 405B compiles in seconds.

Weights and KV cache per device are also computed from the shardings (bytes / shards, the rest
replicated) and match the compiler's argument bytes. `--weight-dtype fp8` lowers the model's FP8
path in the Llama 3.1 405B FP8 release layout: w1, w3, w2 of layers 1..L-2 as float8_e4m3fn with a
float32 scale per output channel and the H100 matmul (per-token activation quantization, an
fp8 x fp8 dot); everything else bf16. The model stacks FP8 FFN weights over all L layers (the
first and last layer's slots hold zeros; their bf16 FFNs live in `dense_ffn`), so the bytes are
the release's plus two layers' FP8 FFN slots.

`--target v5p-16 | h100x8 | ...` (`llama_jax.planning.targets`) compiles the same two programs with that
accelerator's own compiler (libtpu; the CUDA plugin with XLA's H100/H200 target configs), on its
devices, without the hardware: the temporaries and the verdict are then the target compiler's, and
attention "blockwise" is what runs there too. Where the plugin is missing the plan falls back to the
CPU compile and says so ("compiled by").

What the CPU compile cannot see: the fused kernels (cudnn, splash) do not lower on CPU, so the plan
uses "blockwise" attention, whose tiles (`[B, N, block, block]`) bound what a fused kernel keeps
too; fusion differs on GPU/TPU, and runtimes
reserve memory (CUDA context, cuBLAS/cuDNN workspaces, jax's 75% GPU preallocation default). The
`--headroom` fraction (default 0.9) of the device's memory is what a plan may use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

from llama_jax.model.options import DEFAULT_PREFILL_CHUNK, Options

# Importing jax (and the model) does not start its backend: `_start_virtual_devices` still can, in `run`.
from llama_jax.planning import plan_target
from llama_jax.planning.compiled import DTYPE_BYTES
from llama_jax.planning.plan_report import format_plan, write_report

HBM_HEADROOM = 0.9


# ---- arguments ----------------------------------------------------------------------------------


def register(subparsers) -> None:
    """The `plan` command of `python -m llama_jax`."""
    parser = subparsers.add_parser(
        "plan",
        help="per-device memory of a model on a mesh (AOT-compiled, no weights)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a preset (e.g. llama3_1_70b) or a get_config() .py file; its `model` section")
    p.add_argument("--mesh", help="axis sizes, e.g. data=1,fsdp=2,tensor=8 (default: the preset's)")
    p.add_argument("--preset", help="hardware: h100x1, h100x8, h100x16, v5p-128, v6e-256, h100xN, v5p-N, v6e-N")
    p.add_argument(
        "--target",
        help="compile with this accelerator's own compiler (llama_jax.planning.targets: v5e-1/4/8, v5p-2/8/16/32, "
        "v6e-1/4/8, h100x1, h100x8, h200x8); falls back to the CPU estimate, and says so, when its plugin is missing",
    )
    p.add_argument("--strategy", default="fsdp_tp", help="rules table: dp, fsdp, tp, fsdp_tp (default)")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--context", type=int, default=8192, help="KV cache length in tokens (default 8192)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens prefilled (default: the whole context)")
    p.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prefill chunk (default %(default)s)")
    p.add_argument(
        "--attention",
        default="blockwise",
        choices=("blockwise", "dense"),
        help="attention backend compiled (default blockwise; the fused kernels do not lower on CPU)",
    )
    p.add_argument("--weight-dtype", default="bfloat16", choices=("bfloat16", "fp8", "float32"))
    p.add_argument("--cache-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--headroom", type=float, default=HBM_HEADROOM, help="usable fraction of device memory")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--report", metavar="MARKDOWN", help="regenerate the planner tables in this file and exit")


def main(args: argparse.Namespace) -> int:
    try:
        if args.report:
            write_report(pathlib.Path(args.report))
            return 0
        if not args.config:
            raise ValueError("--config is required (or --report)")
        plan = run(args)
    except (FileNotFoundError, ValueError) as e:  # a bad argument: one line naming it, as argparse reports
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _mesh_sizes(args, n_heads: int) -> tuple[dict[str, int], Any]:
    from llama_jax.sharding import mesh as mesh_lib

    target = plan_target.resolve(args)
    if target is not None:
        try:
            sizes = mesh_lib.parse_axes(args.mesh) if args.mesh else target.default_mesh(n_heads)
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None
        if math.prod(sizes.values()) != target.n_devices:
            raise ValueError(
                f"--mesh {args.mesh} has {math.prod(sizes.values())} devices; {target.name} has {target.n_devices}"
            )
        return sizes, target
    if not (args.mesh or args.preset):
        raise ValueError("give --mesh, --preset or both")
    try:
        hardware = mesh_lib.preset(args.preset) if args.preset else None
    except ValueError as e:
        raise ValueError(f"--preset: {e}") from None
    try:
        if args.mesh:
            sizes = mesh_lib.parse_axes(args.mesh)
            if -1 in sizes.values():
                if hardware is None:
                    raise ValueError(f"{args.mesh!r} has -1, which needs --preset (to know the device count)")
                sizes = mesh_lib.resolve_axes(sizes, hardware.n_devices)
        else:
            sizes = mesh_lib.parse_axes(hardware.mesh)
    except ValueError as e:
        raise ValueError(f"--mesh: {e}") from None
    n = math.prod(sizes.values())
    if hardware is not None and n != hardware.n_devices:
        raise ValueError(
            f"--mesh {mesh_lib.format_axes(sizes)} has {n} devices; --preset {hardware.name} has {hardware.n_devices}"
        )
    return sizes, hardware


# ---- the plan -----------------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
    from llama_jax.model.config import model_config_from_file

    config = model_config_from_file(args.config)
    sizes, hardware = _mesh_sizes(args, config.n_heads)
    n_devices = math.prod(sizes.values())
    target, compiler = plan_target.compiler(hardware)
    if target is None:
        _start_virtual_devices(n_devices)

    import jax
    import jax.numpy as jnp

    from llama_jax.model import quant, unstacked
    from llama_jax.sharding import mesh as mesh_lib
    from llama_jax.weights import fp8 as fp8_lib
    from llama_jax.weights import placement

    context = args.context
    prompt = args.prompt or context
    if prompt > context:
        raise ValueError(f"--prompt {prompt} is longer than --context {context}")
    if context > config.max_seq_len:
        raise ValueError(f"--context {context} exceeds the model's max_seq_len {config.max_seq_len}")
    mesh = target.mesh(sizes) if target else mesh_lib.make_mesh(sizes, jax.devices()[:n_devices])
    spec = placement.sharding_spec(mesh, args.strategy)
    weight_dtype = jnp.dtype("bfloat16" if args.weight_dtype == "fp8" else args.weight_dtype)
    cache_dtype = jnp.dtype(args.cache_dtype)
    # FP8: the Llama 3.1 405B FP8 release layout, the FFNs of layers 1..L-2 in rowwise FP8 with the
    # H100 matmul (per-token activation quantization, fp8 x fp8 dot); the rest in bf16.
    fp8 = quant.Fp8Spec(fp8_lib.release_layers(config.n_layers), matmul="fp8") if args.weight_dtype == "fp8" else None

    options = Options(attention_backend=args.attention, fp8=fp8, sharding=spec)
    memory = hardware.memory_bytes if hardware else None
    # The layers held one buffer each where `load` would hold them so (a GPU too small for a second copy).
    graphdef, state = placement.abstract_state(config, options, weight_dtype, by_layer=None, device_bytes=memory)
    by_layer = unstacked.held(state)
    cache = placement.abstract_cache(config, args.batch, context, spec, cache_dtype, by_layer)
    weights = weight_bytes(state)
    kv = sum(_per_device_bytes(x) for x in jax.tree.leaves(cache))
    prefill, decode = _compile(
        graphdef,
        state,
        cache,
        spec,
        args.batch,
        prompt,
        1 if by_layer else config.n_layers,  # layers run one by one: each op is in the text once per layer
        weight_dtype.itemsize,
        chunk=args.chunk,
        target=target,
    )

    budget = int(memory * args.headroom) if memory else None
    temps = max(prefill["temp"], decode["temp"])
    # Non-aliased outputs (last-position logits) and the token arrays are small but counted.
    extra = max(prefill["output"] - prefill["alias"], decode["output"] - decode["alias"])
    need = weights["per_device"] + kv + temps + extra
    kv_token = kv_bytes_per_token(config, spec, cache_dtype.itemsize)
    plan: dict[str, Any] = {
        "model": pathlib.Path(args.config).stem,
        "params": config.num_params(),
        "hardware": hardware.name if hardware else None,
        "compiler": compiler,
        "mesh": sizes,
        "devices": n_devices,
        "strategy": args.strategy,
        "weight_dtype": args.weight_dtype,
        "cache_dtype": args.cache_dtype,
        "batch": args.batch,
        "context": context,
        "prompt": prompt,
        "chunk": min(args.chunk, prompt),
        "attention": args.attention,
        "layers": "unstacked" if by_layer else "stacked",
        "device_memory": memory,
        "budget": budget,
        "weights_total": weights["total"],
        "weights_per_device": weights["per_device"],
        "weights_replicated_per_device": weights["replicated"],
        "kv_cache_per_device": kv,
        "kv_cache_total": sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache)),
        "kv_bytes_per_token_per_device": kv_token["per_device"],
        "kv_head_shards": kv_token["head_shards"],
        "kv_batch_shards": kv_token["batch_shards"],
        "prefill": prefill,
        "decode": decode,
        "temp_per_device": temps,
        "needed_per_device": need,
        "fits": None if budget is None else need <= budget,
    }
    if budget is not None:
        free = budget - weights["per_device"] - temps - extra
        tokens = max(0, free) // kv_token["per_device"] * kv_token["batch_shards"]
        plan["max_cached_tokens"] = tokens  # batch x context that fits, over the whole mesh
        plan["max_batch_at_context"] = _round_down(tokens // context, kv_token["batch_shards"])
        plan["max_context_at_batch"] = min(config.max_seq_len, tokens // args.batch)
    refused = [p["refused"] for p in (prefill, decode) if p.get("refused")]
    if refused:  # the target's compiler said no: no room to report either
        plan.update(fits=False, refused=refused[0], max_cached_tokens=0, max_batch_at_context=0)
        plan.update(max_context_at_batch=0, needed_per_device=max(need, prefill["peak"], decode["peak"]))
    return plan


def _start_virtual_devices(n: int) -> None:
    """Make jax's CPU backend have `n` devices; must run before the backend starts."""
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have < n:
            raise RuntimeError(
                f"jax is already initialised with {have} CPU devices; the plan needs {n}. Run the planner "
                f"in its own process (python -m llama_jax plan ...)"
            )
        return
    # The planner never touches an accelerator: plans for H100s and TPUs are compiled for CPUs.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
    # XLA:CPU has no bf16 dot: it converts bf16 operands to f32, and loop-invariant code motion then
    # hoists the convert of every *stacked* weight out of the layer loop, an f32 copy of all weights
    # (several times the real temporaries of a 405B plan). GPUs and TPUs multiply bf16
    # natively and have no such convert, so the planner compiles without that pass.
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_disable_hlo_passes" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_disable_hlo_passes=while-loop-invariant-code-motion".strip()


def _round_down(x: int, multiple: int) -> int:
    return x // multiple * multiple


def _per_device_bytes(struct) -> int:
    """Bytes of one device's shard of a sharded ShapeDtypeStruct."""
    shard = struct.sharding.shard_shape(struct.shape)
    return math.prod(shard) * struct.dtype.itemsize


def kv_bytes_per_token_per_device(config, spec, itemsize: int = 2) -> int:
    return kv_bytes_per_token(config, spec, itemsize)["per_device"]


def kv_bytes_per_token(config, spec, itemsize: int) -> dict[str, int]:
    """K and V of one token in all layers, on one device of those that hold its batch row."""
    from llama_jax.model.kv_cache import CACHE_AXES, KVCache
    from llama_jax.sharding.rules import shards

    heads_spec = spec.spec(CACHE_AXES, KVCache.shape(config, 1, 1))
    batch_spec = spec.spec(CACHE_AXES, KVCache.shape(config, 1 << 20, 1))
    head_shards = shards(heads_spec, spec.mesh)
    batch_shards = shards(batch_spec, spec.mesh) // head_shards
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * itemsize
    return {"per_device": per_token // head_shards, "head_shards": head_shards, "batch_shards": batch_shards}


def weight_bytes(state) -> dict[str, int]:
    """Weights in total and on one device, from the shardings (replicated bytes counted apart too)."""
    import jax
    from flax import nnx

    total = per_device = replicated = 0
    for _, v in nnx.to_flat_state(state):
        for struct in jax.tree.leaves(v.get_value()):  # one struct, or one per layer (`Unstacked`)
            elems = math.prod(struct.shape)
            shard_elems = math.prod(struct.sharding.shard_shape(struct.shape))
            total += elems * struct.dtype.itemsize
            per_device += shard_elems * struct.dtype.itemsize
            if shard_elems == elems:
                replicated += elems * struct.dtype.itemsize
    return {"total": total, "per_device": per_device, "replicated": replicated}


def _compile(
    graphdef,
    state,
    cache,
    spec,
    batch: int,
    prompt: int,
    n_layers: int,
    float_bytes: int,
    *,
    chunk: int = DEFAULT_PREFILL_CHUNK,
    target=None,
) -> tuple[dict, dict]:
    import contextlib

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llama_jax.model.kv_cache import KVCache
    from llama_jax.planning import targets

    tokens_sharding = spec.sharding(("batch", "seq"), (batch, prompt))
    prompt_tokens = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=tokens_sharding)
    step_sharding = spec.sharding(("batch", "seq"), (batch, 1))
    step_tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=step_sharding)
    cache_shardings = jax.tree.map(lambda x: x.sharding, cache)

    def pin(c: KVCache) -> KVCache:
        return jax.tree.map(jax.lax.with_sharding_constraint, c, cache_shardings)

    def prefill(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state).prefill(tokens, cache, chunk=chunk)
        return logits, pin(cache)

    def decode(state, tokens, positions, cache):
        logits, cache = nnx.merge(graphdef, state).decode(tokens, positions, cache)
        return logits[:, -1], pin(cache)

    results = []
    for fn, inputs in ((prefill, (state, prompt_tokens, cache)), (decode, (state, step_tokens, step_tokens, cache))):
        start = time.perf_counter()
        with targets.tracing(target) if target else contextlib.nullcontext():
            lowered = jax.jit(fn, donate_argnums=len(inputs) - 1).lower(*inputs)
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # libtpu refuses a program that cannot fit its HBM
            if target is None or "RESOURCE_EXHAUSTED" not in str(e):
                raise
            results.append(plan_target.refused(str(e), round(time.perf_counter() - start, 2)))
            continue
        stats = compiled.memory_analysis()
        results.append(
            {
                "argument": int(stats.argument_size_in_bytes),
                "output": int(stats.output_size_in_bytes),
                "alias": int(stats.alias_size_in_bytes),
                "temp": int(stats.temp_size_in_bytes),
                "code": int(stats.generated_code_size_in_bytes),
                "peak": int(
                    stats.argument_size_in_bytes
                    + stats.output_size_in_bytes
                    - stats.alias_size_in_bytes
                    + stats.temp_size_in_bytes
                ),
                "collectives": collective_bytes(compiled.as_text(), n_layers, float_bytes),
                "compile_seconds": round(time.perf_counter() - start, 2),
            }
        )
    return results[0], results[1]


_COLLECTIVE = re.compile(
    r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")


def collective_bytes(hlo_text: str, n_layers: int, float_bytes: int | None = None) -> dict[str, int]:
    """Bytes produced per device by each kind of collective in one run of the program.

    Ops inside the layer scan's while body run once per layer, so they count n_layers times.
    `float_bytes`: count floating-point elements at this size. XLA:CPU upcasts bf16 matmul operands
    to f32 *before* the collectives that feed them, which a bf16 program on GPU/TPU does not.
    """
    out: dict[str, int] = {}
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or "-done(" in line:
            continue
        size = 0
        for dtype, dims in _SHAPE.findall(m.group("type")):
            itemsize = DTYPE_BYTES.get(dtype, 4)
            if float_bytes and dtype in ("f32", "bf16", "f16"):
                itemsize = float_bytes
            size += math.prod(int(d) for d in dims.split(",") if d) * itemsize
        if "while/body" in line:
            size *= n_layers
        out[m.group("op")] = out.get(m.group("op"), 0) + size
    return out

"""Reading a compiled program: what it moves through HBM, what it holds, which kernels and dot types it runs.

    report = compiled.read(lowered.compile())
    report.moved        # bytes per run of the program's outer loop body spent copying in HBM
    report.memory       # argument / output / alias / temp bytes per device (memory_analysis)
    report.dots         # every dot's operand dtypes after compilation
    report.custom_calls # {"__cudnn$fmhaSoftmax": 1, "tpu_custom_call": 2, "__gpu$xla.gpu.triton": 2, ...}

The optimized HLO (`compiled.as_text()`) is the program the device would run: layouts chosen, fusions
made, FP8 rewrites done. What it does *besides* the math shows there as data movement: a `copy`,
`transpose`, `slice`, `dynamic-slice` or `gather` (alone or as the root of a fusion) whose result lives
in HBM reads its input and writes its result, 2x its result's bytes. So does an `all-gather`: the whole
array it assembles from the devices' shards (an FSDP mesh's weights, gathered layer by layer) is written
and read back where each device would otherwise read its own shard once. Results in another memory space
(`S(1)`: TPU VMEM, the prefetches a step needs anyway; `S(2)`.. semaphores and SMEM) are not counted,
nor are in-place `dynamic-update-slice`s.

Loops: the program's first `while` without a trip count known at compile time (the decode loop, a
burst) is the unit, "one step": its body counts once. A loop whose condition compares its counter with
a constant (a layer scan, `fori_loop`s; GPU also prints `known_trip_count`) counts that many times. Two
caveats of the targets' own cost analysis make this reading necessary (docs/TARGETS.md): libtpu's
`bytes accessed` counts a `while` body once and VMEM prefetches several times; the GPU compiler gives none.

Compiled HLO prints operands by name only, without their types; a dot's operand dtypes are read from
the instructions that define them in the same computation (a fusion's parameters carry their types).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time

# Bytes per element of each HLO element type (the planner's collective counts read them too).
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
DTYPE_BYTES.update({"f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1})
MEMORY = ("argument", "output", "alias", "temp", "generated_code")  # memory_analysis, per device
MOVES = ("copy", "transpose", "slice", "dynamic-slice", "gather", "copy-start", "all-gather", "all-gather-start")
# The custom-call targets of Pallas kernels: Mosaic (TPU) and Triton (GPU).
TPU_KERNEL, TRITON_KERNEL = "tpu_custom_call", "__gpu$xla.gpu.triton"
_LAYOUT_OR_CONVERT = ("convert", "bitcast", "copy", "transpose", "broadcast")
_SKIP = ("bitcast", "reshape", "get-tuple-element", "tuple")

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\](\{[^}]*\})?")


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    type: str  # the result type, as printed: "bf16[8,128]{1,0:T(8,128)(2,1)}" or a tuple
    op: str
    rest: str  # operands and attributes

    @property
    def operands(self) -> list[str]:
        depth, out = 0, []
        for i, ch in enumerate(self.rest):
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    return re.findall(r"%([\w.\-]+)", self.rest[:i]) or out
                depth -= 1
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", self.rest)
        return m.group(1) if m else None

    @property
    def dtype(self) -> str:
        m = _ARRAY.search(self.type)
        return m.group(1) if m else ""


def array_bytes(type_str: str, hbm_only: bool = False) -> int:
    """Bytes of the arrays in a printed HLO type (a tuple: all its arrays); `hbm_only`: skip those
    placed in another memory space (`S(n)` in the layout)."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(type_str):
        if hbm_only and re.search(r"S\(\d+\)", layout or ""):
            continue
        total += math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES.get(dtype, 4)
    return total


def parse(hlo_text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation name: its instructions} and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(2), [])
                entry = m.group(2) if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            m = _INSTR.match(line)
            if m:
                current.append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


@dataclasses.dataclass
class Move:
    computation: str
    instr: str
    kind: str  # the data-movement op (a fusion: its root's)
    bytes: int  # read + write, once
    times: int  # per step (or per call, outside the step loop)
    in_step: bool  # inside the step loop
    dtype: str = ""  # the element type it writes ("f8e4m3fn": an FP8 weight moved)
    shape: tuple[int, ...] = ()  # of the array it writes


@dataclasses.dataclass
class Dot:
    computation: str
    instr: str
    lhs: str  # operand dtypes after compilation
    rhs: str
    upcast_from: str  # "f8e4m3fn" when an operand is a convert of an FP8 value in the same computation, else ""


@dataclasses.dataclass
class Report:
    moves: list[Move]
    dots: list[Dot]
    custom_calls: dict[str, int]
    memory: dict[str, int]
    cost_bytes_accessed: float | None  # the target's own count (libtpu), as it reports it
    compile_seconds: float | None = None
    _step_loop: bool = False  # the program has a step loop (a `while` of unknown trip count)

    @property
    def step_moves(self) -> list[Move]:
        """The moves of one step (all of them in a program without a step loop)."""
        return [m for m in self.moves if m.in_step or not self._step_loop]

    @property
    def moved(self) -> int:
        """Bytes of HBM data movement per step (per call in a program without a step loop)."""
        return sum(m.bytes * m.times for m in self.step_moves)

    def largest_moves(self, n: int = 5) -> list[Move]:
        return sorted(self.step_moves, key=lambda m: -m.bytes * m.times)[:n]

    def moves_at_least(self, nbytes: int) -> list[Move]:
        """Moves whose single occurrence reads (or writes) at least `nbytes`."""
        return [m for m in self.step_moves if m.bytes // 2 >= nbytes]

    def fp8_dots(self) -> list[Dot]:
        return [d for d in self.dots if d.lhs.startswith("f8") and d.rhs.startswith("f8")]

    def fp8_upcast_dots(self) -> list[Dot]:
        return [d for d in self.dots if d.upcast_from.startswith("f8")]

    def attention_kernels(self) -> dict[str, int]:
        """cuDNN's fused attention, and the Pallas kernels (Mosaic on TPU, Triton on GPU: only attention
        kernels are Pallas calls in this project's programs)."""
        return {k: n for k, n in self.custom_calls.items() if "fmha" in k or k in (TPU_KERNEL, TRITON_KERNEL)}


def _trip_count(instr: Instr, comps) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
    if m:
        return int(m.group(1))
    cond = comps.get(instr.attr("condition") or "", [])
    compares = [i for i in cond if i.op == "compare"]
    if len(compares) != 1 or any(i.op in ("and", "or", "fusion", "call") for i in cond):
        return None
    c = compares[0]
    consts = {i.name: i for i in cond if i.op == "constant"}
    bound = [consts[o] for o in c.operands if o in consts]
    if "direction=LT" not in c.rest or len(bound) != 1:
        return None
    m = re.match(r"\s*(-?\d+)\)", bound[0].rest)
    return int(m.group(1)) if m else None


def _root(comp: list[Instr]) -> Instr | None:
    """The fused computation's last instruction that is not a bitcast/reshape/tuple (its real root)."""
    for instr in reversed(comp):
        if instr.op not in _SKIP:
            return instr
    return None


def _moves(comps, name: str, times: int, out: list[Move], loop: list, in_step: bool = False) -> None:
    """Append the moves of computation `name` (run `times` times per step) and of what it calls.
    loop: [the step loop was found (or is not looked for), trips of a loop of unknown trip count]."""
    for instr in comps.get(name, []):
        if instr.op == "while":
            trips = _trip_count(instr, comps)
            if trips is None and not loop[0]:
                loop[0] = True
                _moves(comps, instr.attr("body"), 1, out, loop, True)
            else:
                _moves(comps, instr.attr("body"), times * (trips or loop[1]), out, loop, in_step)
        elif instr.op == "conditional":
            for branch in re.findall(r"%([\w.\-]+)", instr.rest.split("branch_computations=")[-1].split("}")[0]):
                _moves(comps, branch, times, out, loop, in_step)
        elif instr.op in ("call", "async-start"):
            _moves(comps, instr.attr("to_apply") or instr.attr("calls"), times, out, loop, in_step)
        else:
            kind = instr.op
            if instr.op == "fusion":
                root = _root(comps.get(instr.attr("calls") or "", []))
                kind = root.op if root is not None else ""
            if kind not in MOVES:
                continue
            arrays = list(_ARRAY.finditer(instr.type))  # copy-start: (destination, source, context)
            if not arrays:
                continue
            # all-gather-start: (its shard, the gathered array); an all-gather of a tuple: each array.
            written = arrays[-1] if kind == "all-gather-start" else arrays[0]
            # A prefetch unless it lands in HBM.
            one = kind in ("copy-start", "all-gather-start")
            nbytes = array_bytes(written.group(0) if one else instr.type, hbm_only=True)
            if nbytes:
                shape = tuple(int(d) for d in written.group(2).split(",") if d)
                out.append(Move(name, instr.name, kind, 2 * nbytes, times, in_step, instr.dtype, shape))


def _dots(comps) -> list[Dot]:
    out = []
    for cname, comp in comps.items():
        defs = {i.name: i for i in comp}
        for instr in comp:
            if instr.op not in ("dot", "convolution"):
                continue
            ops = [defs.get(o) for o in instr.operands[:2]]
            dtypes = [o.dtype if o else "?" for o in ops]
            upcast = ""
            for o in ops:  # follow layout-only ops back to a convert of an FP8 value
                for _ in range(8):
                    if o is None or o.op not in _LAYOUT_OR_CONVERT or not o.operands:
                        break
                    src = defs.get(o.operands[0])
                    if o.op == "convert" and src is not None and src.dtype.startswith("f8") and o.dtype != src.dtype:
                        upcast = src.dtype
                    o = src
            out.append(Dot(cname, instr.name, dtypes[0], dtypes[1], upcast))
    return out


def read_text(hlo_text: str, *, step_loop: bool = True, dynamic_trips: int = 1) -> Report:
    """A `Report` of optimized HLO text alone (no memory or cost figures).

    step_loop: the program's first loop of unknown trip count is its step loop (a decode loop, a
    burst), whose body counts once; False: the program is one step (a prefill).
    dynamic_trips: how many times any other loop of unknown trip count runs (the key blocks a
    length-aware attention loop visits in the case reported)."""
    comps, entry = parse(hlo_text)
    moves: list[Move] = []
    loop = [not step_loop, dynamic_trips]
    _moves(comps, entry, 1, moves, loop)
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))
    return Report(moves, _dots(comps), dict(calls), {}, None, _step_loop=step_loop and loop[0])


def memory(compiled) -> dict[str, int]:
    """Per-device bytes from `compiled.memory_analysis()`; peak = arguments + outputs - aliased + temps."""
    stats = compiled.memory_analysis()
    return with_peak({k: int(getattr(stats, f"{k}_size_in_bytes")) for k in MEMORY})


def with_peak(memory: dict[str, int]) -> dict[str, int]:
    """`memory` and its peak: arguments + outputs - aliased + temporaries."""
    return {**memory, "peak": memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]}


def read(compiled, compile_seconds: float | None = None, **loops) -> Report:
    """A `Report` of a `jax.stages.Compiled` program (`loops`: as `read_text`'s)."""
    report = read_text(compiled.as_text(), **loops)
    report.memory = memory(compiled)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    report.cost_bytes_accessed = float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
    report.compile_seconds = compile_seconds
    return report


def compile_and_read(lowered, **loops) -> Report:
    start = time.perf_counter()
    compiled = lowered.compile()
    return read(compiled, round(time.perf_counter() - start, 1), **loops)

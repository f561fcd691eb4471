"""A deep program read from two shallow compiles: what the report's per-layer programs need at full depth.

    a, b = (depth.reading(report_at(d), d, layers=32) for d in depth.DEPTHS)
    row = depth.extrapolate(a, b)     # the 32-layer program, from its 3- and 5-layer compiles

`generate`'s decode loop and the engine's burst run the layers unrolled where the per-layer weights fit
(`decoding.decode_unroll`), so their compile time grows with depth: a 70B decode compiled whole for
8 H100s takes minutes on a 2-core machine. Everything the report reads of them is affine in the layer count L, given
the program at depth d: its buffers (weights, cache, temporaries) are a per-layer part plus the rest;
its dots, kernels and copies are per-layer instructions plus the rest. One kind of copy is not: a copy
of the whole stacked cache (`[L, B, S, K, H]`) made once per layer moves L x L x (one layer's cache).
So every copy is first scaled to full depth by its own shape (a copy with an axis of length d moves
L/d times its bytes at depth d), and only then are the counts extrapolated, linearly in d, to L.

The depths are odd so that an axis of length d is the layer axis: every other axis of these programs is
a power of two or a model width (batch, heads, head dim, pages), never 3 or 5. It holds where the
compiler makes the same per-layer choices at every depth: the GPU compiler does (every GPU decode of
the report agrees with its full-depth compile), libtpu does not (whether it re-lays out the cache per
layer depends on the whole program), so the report uses it for GPU decodes only: docs/TARGETS.md.
"""

from __future__ import annotations

import collections
import dataclasses

from llama_jax.planning import compiled

# 3 layers is the shallowest FP8 release layout with an FP8 layer between its two bf16 ones.
DEPTHS = (3, 5)


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the report reads of one compiled program, for a model of `layers` layers."""

    layers: int
    compiled_layers: tuple[int, ...]  # the depths actually compiled: (layers,) or `DEPTHS`
    moves: dict[tuple[str, int], int]  # (kind, bytes read + written once) -> times per step
    memory: dict[str, int]  # memory_analysis per device, and "peak"
    dots: int
    fp8_dots: int
    fp8_upcast_dots: int
    attention_kernels: dict[str, int]
    cost_bytes_accessed: float | None  # libtpu's own count, as it reports it

    @property
    def moved(self) -> int:
        """Bytes of HBM data movement per step (`compiled.Report.moved`)."""
        return sum(nbytes * times for (_, nbytes), times in self.moves.items())

    def largest_moves(self, n: int) -> list[tuple[str, int, int]]:
        """(kind, bytes, times) of the n moves with the most traffic per step."""
        moves = sorted(self.moves.items(), key=lambda kv: -kv[0][1] * kv[1])[:n]
        return [(kind, nbytes, times) for (kind, nbytes), times in moves]


def reading(report: compiled.Report, depth: int, layers: int | None = None) -> Reading:
    """The `Reading` of a program compiled at `depth` layers, its copies scaled to a model of `layers`
    (default `depth`: the program as compiled)."""
    layers = depth if layers is None else layers
    moves: collections.Counter = collections.Counter()
    for m in report.step_moves:
        nbytes = m.bytes * layers // depth if depth in m.shape and layers != depth else m.bytes
        moves[m.kind, nbytes] += m.times
    return Reading(
        layers,
        (depth,),
        dict(moves),
        dict(report.memory),
        len(report.dots),
        len(report.fp8_dots()),
        len(report.fp8_upcast_dots()),
        report.attention_kernels(),
        report.cost_bytes_accessed,
    )


def extrapolate(a: Reading, b: Reading) -> Reading:
    """The program at `a.layers` layers from its readings at two depths (each already scaled by
    `reading` to that many layers): every count and byte figure extended along the line through them."""
    (da,), (db,) = a.compiled_layers, b.compiled_layers
    if a.layers != b.layers or da == db:
        raise ValueError(f"need two depths of one model, got {da} and {db} layers for {a.layers} and {b.layers}")
    t = (a.layers - da) / (db - da)

    def line(x, y):
        return None if x is None or y is None else max(0, round(x + (y - x) * t))

    def lines(x: dict, y: dict) -> dict:
        out = {k: line(x.get(k, 0), y.get(k, 0)) for k in {**x, **y}}
        return {k: v for k, v in out.items() if v}

    return Reading(
        a.layers,
        (da, db),
        lines(a.moves, b.moves),
        compiled.with_peak({k: line(a.memory[k], b.memory[k]) for k in compiled.MEMORY}),
        line(a.dots, b.dots),
        line(a.fp8_dots, b.fp8_dots),
        line(a.fp8_upcast_dots, b.fp8_upcast_dots),
        lines(a.attention_kernels, b.attention_kernels),
        line(a.cost_bytes_accessed, b.cost_bytes_accessed),
    )

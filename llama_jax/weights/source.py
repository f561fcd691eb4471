"""Checkpoints whose tensors are named in a released layout (HF or Meta): the checks and reads they share.

A subclass says which tensors it holds (`names`, `shape`, `dtype`, `where`) and reads one in its own
layout (`read(name)`); this base maps our parameters to those names (`layout.source_names`), moves a
tensor into our layout (`Rule.to_ours`, a view) and checks the whole set against the config.
"""

from __future__ import annotations

import numpy as np

from llama_jax.weights import fp8, layout
from llama_jax.weights.checkpoint import ArrayLike, Checkpoint

# Tensors some writers add that carry no weights (HF's non-persistent rotary buffer).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class SourceCheckpoint(Checkpoint):
    fmt: str  # "hf" or "meta": which of `layout.Rule`'s names the tensors carry
    quantization: dict | None = None  # set by FP8 checkpoints
    buffers: frozenset[str] = frozenset()  # stored tensors that are no weights, checked by `buffer_problems`

    def buffer_problems(self) -> list[str]:
        """What is wrong with the `buffers` present (they are checked, never skipped)."""
        return []

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` in the source layout: a view where possible, nothing copied whole."""
        raise NotImplementedError

    def where(self, name: str) -> str:
        """The file holding tensor `name`, for error messages."""
        raise NotImplementedError

    def source_name(self, param: layout.Path, layer: int | None) -> str:
        names = layout.source_names(self.rule(param), self.config, self.fmt)
        return names[0 if layer is None else layer]

    def stored_dtype(self, param: layout.Path) -> np.dtype:
        return self.dtype(self.source_name(param, 0 if self.rule(param).per_layer else None))

    def tensor(self, param: layout.Path, layer: int | None) -> ArrayLike:
        return self.rule(param).to_ours(self.read(self.source_name(param, layer)), self.config)

    def check(self) -> None:
        """Every tensor the config needs is present with the right shape and a float dtype; nothing unknown.

        All problems are collected into one error, so a user fixes a broken checkpoint in one go.
        """
        config = self.config
        names = self.names()
        problems: list[str] = []
        expected: set[str] = set()
        for rule in layout.rules_for(config, self.score_labels):
            want = rule.source_shape(config)
            for name in layout.source_names(rule, config, self.fmt):
                expected.add(name)
                if name not in names:
                    problems.append(f"missing tensor {name!r} (expected shape {list(want)})")
                    continue
                got = self.shape(name)
                if got != want:
                    problems.append(
                        f"tensor {name!r} in {self.where(name)} has shape {list(got)}, expected {list(want)}"
                    )
                dtype = self.dtype(name)
                if dtype.kind not in "fV" and dtype.name not in ("bfloat16", "float8_e4m3fn"):
                    problems.append(f"tensor {name!r} in {self.where(name)} has dtype {dtype}, expected a float type")
                if dtype == fp8.DTYPE:
                    problems += fp8.check_source_tensor(self, rule, name, want, expected)
        tied_head = {"lm_head.weight", "output.weight"} if config.tie_embeddings else set()
        problems += self.buffer_problems()
        unknown = sorted(n for n in names - expected - tied_head - self.buffers if not n.endswith(_IGNORED_SUFFIXES))
        if unknown:
            shown = ", ".join(repr(n) for n in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            problems.append(f"{len(unknown)} unexpected tensor(s) for this config: {shown}")
        if problems:
            raise ValueError(f"{self.path}: checkpoint does not match its config:\n  - " + "\n  - ".join(problems))
        self.fp8_layers  # noqa: B018 - an FP8 checkpoint's layers are checked against its quantization config here

"""A training run's directory: Orbax checkpoints of the trainer's state, and the metrics log.

    workdir/checkpoints/<step>/   `state` (params + optimizer state) and `meta` (step, trainable kind, config)
    workdir/metrics.jsonl         one JSON object per logged step

The step is the data position (`data.Loader.batch(step)` depends only on it), so restoring a
checkpoint and cutting the log back to its step resumes a killed run exactly.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

from llama_jax.weights import atomic

__all__ = ["Workdir"]


class Workdir:
    """Checkpoints (at most `keep`, the oldest dropped) and the metrics log of the run in `path`."""

    def __init__(self, path: str | pathlib.Path, *, keep: int) -> None:
        self.path = pathlib.Path(path)
        self.keep = keep
        self._manager = None

    def checkpoints(self):
        """The Orbax `CheckpointManager` of `path/checkpoints`, created on first use."""
        import orbax.checkpoint as ocp

        if self._manager is None:
            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True)
            self._manager = ocp.CheckpointManager((self.path / "checkpoints").absolute(), options=options)
        return self._manager

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint; None if there is none."""
        return self.checkpoints().latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write `state` (a pytree of arrays) and `meta` (JSON) as checkpoint `step`; Orbax commits it atomically."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.checkpoints().save(step, args=args)

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Checkpoint `step`: its state, laid out as `target` (shapes, dtypes, shardings), and its meta."""
        import orbax.checkpoint as ocp

        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self.checkpoints().restore(step, args=args)
        return restored.state, restored.meta

    def wait(self) -> None:
        """Return once every checkpoint started has been written."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def log(self, metrics: dict[str, float]) -> None:
        """Append one step's metrics to `metrics.jsonl`."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def truncate_log(self, step: int) -> None:
        """Drop metrics lines of steps after `step`: a killed run logged steps that will be redone."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
        atomic.write_atomically(path, "".join(kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line

"""The planner answered by a target's own compiler (`plan --target v5p-16 | h100x8 | ...`).

`plan.run` compiles its prefill and decode on the target's devices (`llama_jax.planning.targets`) when the
target's plugin is installed, and says which compiler answered; without the plugin it falls back to
the CPU estimate and says that. libtpu refuses to compile a program that cannot fit its HBM: that
refusal is the verdict, with the bytes it says the program needs.
"""

from __future__ import annotations

import re
from typing import Any


def resolve(args):
    """The `--target` (None without one), checked before any compiling."""
    if not getattr(args, "target", None):
        return None
    from llama_jax.planning import targets

    if args.preset:
        raise ValueError("give --target or --preset, not both")
    try:
        return targets.get(args.target)
    except ValueError as e:
        raise ValueError(f"--target: {e}") from None


def compiler(hardware) -> tuple[Any, str]:
    """(the target to compile for, or None for the CPU) and how the plan is compiled, in words."""
    from llama_jax.planning import targets

    if not isinstance(hardware, targets.Target):
        return None, "cpu (XLA:CPU estimate)"
    try:
        targets.check_plugin(hardware)
    except targets.PluginMissing as e:
        return None, f"cpu (XLA:CPU estimate: {e})"
    import jax

    jax.config.update("jax_platforms", "cpu")  # jax runs on the CPU; the plugin only compiles
    kind = "libtpu" if hardware.platform == "tpu" else "XLA GPU compiler, XLA's target config"
    return hardware, f"{hardware.lowering_platform} ({kind}: {hardware.devices()[0].device_kind})"


def refused(message: str, seconds: float) -> dict:
    """A phase the target's compiler refused to compile for want of memory, with the bytes it said the
    program needs in all (libtpu: "the total memory required for HLO temporaries (108.80G) exceeds
    available HBM (95.74G)"; that total holds the arguments too)."""
    m = re.search(r"required for HLO temporaries \(([\d.]+)G\)", message)
    peak = int(float(m.group(1)) * (1 << 30)) if m else 0
    line = next((x for x in message.splitlines() if "RESOURCE_EXHAUSTED" in x), message.splitlines()[0])
    keys = ("argument", "output", "alias", "code", "temp")
    return {**dict.fromkeys(keys, 0), "peak": peak, "collectives": {}, "compile_seconds": seconds, "refused": line}

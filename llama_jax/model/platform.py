"""What differs by platform, decided in one place: the FP8 matmul mode, and the environment a GPU job runs in.

- FP8 matmul (`quant.Fp8Spec.matmul`): where the GPU has FP8 tensor cores, i.e. CUDA compute
  capability 8.9 (Ada) or newer (Hopper 9.0, Blackwell 10.x), "auto": FP8 GEMMs (per-token activation
  quantization, fp8×fp8 dots) for products of many rows, the weight-only FP8 read with bf16 compute
  for decode's few (`quant.matmul_mode`); "dequant" (upcast the weight inside the jitted matmul)
  everywhere else: CPUs, older GPUs, TPUs.
- The attention backend is chosen by `llama_jax.model.attention.select`, per platform, dtype and length;
  this module does not repeat that rule, it supplies the platform: `target()`, the one programs are
  being built for. That is JAX's default backend, unless `lowering_for("cuda")` (or "tpu") says a
  program is traced here to be lowered for another machine (`sampler.lower`, `Trainer.lower_step`).
- A GPU job's environment (`GPU_ENV`, `GPU_XLA_FLAGS`), applied by the CLI before JAX creates its
  backend, and only when a CUDA device is expected: XLA reads both once, when the backend starts.
  Values the user set win. Every flag name is checked against the installed jaxlib by a test (the CPU
  jaxlib parses GPU flags too and refuses unknown ones).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import MutableMapping

import jax

from llama_jax.model import quant

FP8_MATMUL_MODES = quant.MODES
FP8_TENSOR_CORES = (8, 9)  # compute capability of the first GPUs with FP8 tensor cores (Ada, sm_89)

# XLA's default is 75% of the GPU; the rest is left to cuDNN/cuBLAS workspaces and the CUDA context.
# 0.90 is what NVIDIA's JAX-Toolbox runs LLM jobs with (their "GPU performance" page): a 70B-on-8
# or 8B-at-128K job fits where it would not at 0.75.
GPU_ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90"}

# Each flag says why; all are accepted by jaxlib 0.10.2 (tests/test_platform.py parses them).
GPU_XLA_FLAGS = (
    # Schedule collectives (FSDP all-gathers, TP reduce-scatters) to overlap compute; JAX-Toolbox's default.
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # Give collectives the highest-priority stream, so a long GEMM does not delay the next layer's gather.
    "--xla_gpu_enable_highest_priority_async_stream=true",
)

CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")

# Part of JAX's jit cache key: a program traced for one target is never reused for another.
_TARGET = jax.make_user_context(default_value=None)


def target() -> str:
    """The platform the program being traced is for: "cpu", "gpu" or "tpu"."""
    return _TARGET.value or jax.default_backend()


def lowering_for(platform: str | None):
    """Context manager: trace programs for `platform` ("cuda"/"gpu", "tpu", "cpu"; None: this machine's)."""
    if platform not in (None, "cpu", "cuda", "gpu", "rocm", "tpu"):
        raise ValueError(f"platform {platform!r}: expected cpu, cuda, rocm, gpu or tpu")
    return _TARGET("gpu" if platform in ("cuda", "rocm") else platform)


def has_fp8_tensor_cores(device: jax.Device) -> bool:
    """Whether `device` is a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    if not capability:
        return False
    major, minor = (int(part) for part in str(capability).split(".")[:2])
    return (major, minor) >= FP8_TENSOR_CORES


def fp8_matmul(requested: str = "auto", device: jax.Device | None = None) -> str:
    """The FP8 matmul mode to run: `requested` unless "auto", which stays "auto" (decided per product by its
    rows, `quant.matmul_mode`) on FP8-tensor-core GPUs and is "dequant" elsewhere."""
    if requested not in FP8_MATMUL_MODES:
        raise ValueError(f"fp8 matmul {requested!r}: expected one of {FP8_MATMUL_MODES}")
    if requested != "auto":
        return requested
    return "auto" if has_fp8_tensor_cores(device or jax.devices()[0]) else "dequant"


def cuda_expected(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether JAX will start on a CUDA GPU, decided WITHOUT starting a backend (which would fix the flags).

    True when JAX_PLATFORMS asks for cuda/gpu, or (unset) when a jax CUDA plugin is installed and the
    machine has an NVIDIA driver device node. Never on a CPU-only machine.
    """
    environ = os.environ if environ is None else environ
    platforms = environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return platforms.split(",")[0].strip() in ("cuda", "gpu")
    has_plugin = any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)
    return has_plugin and pathlib.Path("/dev/nvidiactl").exists()


def gpu_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The variables to set for a GPU job, given the current environment: ours, where the user set none.

    A flag already in XLA_FLAGS (by name, whatever its value) is left as the user gave it.
    """
    updates = {name: value for name, value in GPU_ENV.items() if name not in environ}
    current = environ.get("XLA_FLAGS", "")
    given = {part.split("=")[0] for part in current.split()}
    extra = [flag for flag in GPU_XLA_FLAGS if flag.split("=")[0] not in given]
    if extra:
        updates["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return updates


def configure_gpu_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply `gpu_environment` when a CUDA device is expected (→ what was set); on other machines nothing.

    Call before the first JAX computation: XLA reads these when its backend starts, and never again.
    """
    environ = os.environ if environ is None else environ
    if not cuda_expected(environ):
        return {}
    updates = gpu_environment(environ)
    environ.update(updates)
    return updates


def enable_compile_cache() -> None:
    """Persist compiled programs across runs (unless the user configured JAX's cache already)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path.home() / ".cache" / "llama_jax" / "xla"))

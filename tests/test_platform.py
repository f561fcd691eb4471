"""Per-platform defaults (`llama_jax.model.platform`): the FP8 matmul mode by device, the GPU job environment
(every XLA flag accepted by the installed jaxlib, user settings kept, applied before JAX starts and
never on a CPU machine), and the platform programs are traced for."""

import os
import subprocess
import sys
import types

import pytest

from llama_jax.model import platform


def _device(kind: str, capability: str | None = None):
    return types.SimpleNamespace(platform=kind, compute_capability=capability)


@pytest.mark.parametrize(
    ("device", "mode"),
    [
        (_device("gpu", "9.0"), "auto"),  # H100 / H200
        (_device("gpu", "8.9"), "auto"),  # L4 / L40S (Ada)
        (_device("gpu", "10.0"), "auto"),  # B200
        (_device("gpu", "8.0"), "dequant"),  # A100: no FP8 tensor cores
        (_device("tpu"), "dequant"),
        (_device("cpu"), "dequant"),
    ],
)
def test_auto_fp8_matmul_decides_per_product_exactly_on_gpus_with_fp8_tensor_cores(device, mode):
    """`auto` stays "auto" (FP8 GEMMs or the weight-only read, by each product's rows:
    `quant.matmul_mode`) where FP8 tensor cores exist, and is "dequant" everywhere else."""
    assert platform.fp8_matmul("auto", device) == mode
    assert platform.fp8_matmul("dequant", device) == "dequant"  # an explicit choice is kept
    assert platform.fp8_matmul("fp8", device) == "fp8"


def test_auto_fp8_matmul_on_this_cpu_machine_is_dequant_and_typos_are_refused():
    assert platform.fp8_matmul() == "dequant"
    with pytest.raises(ValueError, match="fp8 matmul 'fp16'"):
        platform.fp8_matmul("fp16")


def test_the_gpu_environment_keeps_what_the_user_set():
    ours = platform.gpu_environment({})
    assert ours["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert ours["XLA_FLAGS"].split() == list(platform.GPU_XLA_FLAGS)
    user = {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
        "XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_gpu_enable_latency_hiding_scheduler=false",
    }
    updates = platform.gpu_environment(user)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in updates
    flags = updates["XLA_FLAGS"].split()
    assert flags[:2] == user["XLA_FLAGS"].split()  # the user's flags first and unchanged
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert set(flags[2:]) == set(platform.GPU_XLA_FLAGS) - {"--xla_gpu_enable_latency_hiding_scheduler=true"}


def test_nothing_is_applied_on_a_machine_without_a_cuda_device():
    env = {"JAX_PLATFORMS": "cpu"}
    assert platform.configure_gpu_environment(env) == {} and env == {"JAX_PLATFORMS": "cpu"}
    env = {"JAX_PLATFORMS": "cuda"}
    assert platform.configure_gpu_environment(env)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert env["XLA_FLAGS"]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_every_gpu_flag_is_one_the_installed_jaxlib_knows():
    """XLA parses every flag (GPU ones too) when a backend starts and aborts on an unknown one."""
    code = "import jax; jax.numpy.zeros(1).block_until_ready()"
    assert _run(code, XLA_FLAGS=" ".join(platform.GPU_XLA_FLAGS)).returncode == 0
    bad = _run(code, XLA_FLAGS="--xla_gpu_no_such_flag=true")  # ... and the check can fail
    assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr


def test_the_cli_sets_the_environment_before_jax_starts_its_backend():
    """After importing the CLI and every command, XLA_FLAGS still take effect (the backend has not
    started): a bad flag set now aborts the first computation."""
    code = (
        "import os, llama_jax.cli as cli; cli.build_parser(); "
        "os.environ['XLA_FLAGS'] = '--xla_gpu_no_such_flag=true'; import jax; jax.devices()"
    )
    result = _run(code)
    assert result.returncode != 0 and "xla_gpu_no_such_flag" in result.stderr


def test_programs_are_traced_for_this_machine_unless_lowering_for_another():
    assert platform.target() == "cpu"
    with platform.lowering_for("cuda"):
        assert platform.target() == "gpu"
    with platform.lowering_for("tpu"):
        assert platform.target() == "tpu"
    with pytest.raises(ValueError, match="platform 'h100'"):
        platform.lowering_for("h100")


def test_load_and_the_jobs_refuse_a_setting_this_platform_cannot_run_before_anything_is_read(tmp_path):
    """One loading sequence (`loading.load`): the settings first, then the checkpoint, for every caller."""
    import llama_jax
    from llama_jax.jobs import jobs

    with pytest.raises(ValueError, match="fp8_matmul: expected one of .*, got 'fp16'"):  # before the path
        llama_jax.load(tmp_path / "missing", fp8_matmul="fp16")
    with pytest.raises(ValueError, match="attention='cudnn' needs an NVIDIA GPU"):
        llama_jax.load(tmp_path / "missing", attention="cudnn")
    with pytest.raises(ValueError, match="dtype: expected bfloat16 or float32"):
        llama_jax.load(tmp_path / "missing", dtype="bfloat17")
    with pytest.raises(ValueError, match="fp8_matmul: expected one of"):  # even for the embedded model
        jobs.load_model(None, fp8_matmul="FP8")

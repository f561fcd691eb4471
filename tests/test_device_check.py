"""`benchmarks/device_check.py --smoke` runs end to end on CPU (tiny shapes) and writes every check's
entry: the prepared GPU run cannot die on a typo the day a GPU is at hand. The GPU-only piece (cuDNN
parity) must degrade to a message, not a crash."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
CHECKS = (
    "hbm_bandwidth",
    "matmul_peak",
    "attention_parity",
    "decode_attention",
    "build_8b",
    "decode_bf16",
    "prefill_mfu",
    "prefill_128k",
    "drop_8b",
    "decode_fp8",
    "train_mfu_1b",
)


def test_the_device_check_runs_end_to_end_in_smoke_mode(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "device_check.py"), "--smoke", "--out", str(tmp_path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    [path] = tmp_path.glob("device_*.json")
    result = json.loads(path.read_text())
    assert result["smoke"] is True and result["platform"] == "cpu"
    checks = result["checks"]
    assert tuple(checks) == CHECKS
    failed = {
        name: c.get("message") for name, c in checks.items() if c["status"] != "ok" and name != "attention_parity"
    }
    assert failed == {}
    assert checks["attention_parity"] == {
        "status": "error",
        "seconds": checks["attention_parity"]["seconds"],
        "message": "RuntimeError: cuDNN attention needs an NVIDIA GPU; this run is on cpu",
        "traceback": checks["attention_parity"]["traceback"],
    }
    assert checks["decode_attention"]["pass"] is True  # the GPU decode kernel, in interpret mode here
    assert {"seconds_per_step", "pct_of_hbm_roofline", "tokens_per_s"} <= set(checks["decode_bf16"]["rows"][0])
    assert {"fp8_gemm_custom_calls", "uses_fp8_gemms", "rows", "auto_rows"} <= set(checks["decode_fp8"])
    assert checks["decode_fp8"]["uses_fp8_gemms"] is False  # a CPU program has no cuBLASLt FP8 GEMMs
    assert {"mfu_pct", "flops_per_s"} <= set(checks["prefill_mfu"]["rows"][0]) and "mfu_pct" in checks["train_mfu_1b"]
    assert {"memory_before", "memory_after", "seconds"} <= set(checks["prefill_128k"])


def test_the_fp8_gemm_detector_finds_the_fp8_gemms_of_a_compiled_h100_program():
    """Compiled for H100 on this CPU (llama_jax.planning.targets): an f8 x f8 dot becomes a GEMM fusion whose
    operands are printed untyped; the detector must still see it, and must not count a dot that
    converts its FP8 operand up first."""
    import jax
    import jax.numpy as jnp
    import pytest
    from jax.sharding import NamedSharding, PartitionSpec

    from benchmarks import device_check
    from llama_jax.planning import targets

    target = targets.get("h100x1")
    try:
        targets.check_plugin(target)
    except targets.PluginMissing as e:
        pytest.skip(str(e))
    sharding = NamedSharding(target.mesh({"x": 1}), PartitionSpec())
    x = jax.ShapeDtypeStruct((64, 4096), jnp.float8_e4m3fn, sharding=sharding)
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.float8_e4m3fn, sharding=sharding)
    dims = (((1,), (0,)), ((), ()))
    fp8 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32))
    upcast = jax.jit(lambda x, w: jax.lax.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dims))
    [call] = device_check.fp8_gemm_calls(fp8.lower(x, w).compile().as_text())
    assert "f8e4m3fn x f8e4m3fn" in call
    assert device_check.fp8_gemm_calls(upcast.lower(x, w).compile().as_text()) == []

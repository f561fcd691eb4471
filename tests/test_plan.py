"""The memory planner: compiled per-device bytes that add up, for a small model and a real one.

Each plan runs as `python -m llama_jax plan ... --json` in its own process, as a user runs it: the
planner creates its own virtual devices (this test process already has 8).
"""

import pathlib

import jax.numpy as jnp
import pytest

from llama_jax.model import quant
from llama_jax.model.config import model_config_from_file
from llama_jax.model.options import DEFAULT_PREFILL_CHUNK, Options
from llama_jax.planning import plan, plan_report
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.weights import placement

ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny_plan():
    return plan_report.plan_subprocess(
        [
            "--config",
            "tiny",
            "--mesh",
            "fsdp=2,tensor=4",
            "--batch",
            "8",
            "--context",
            "256",
            "--preset",
            "cpu",
        ]
    )


def test_small_plan_bytes_add_up(tiny_plan):
    p = tiny_plan
    config = model_config_from_file("tiny")
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 2, "kv_rep": 1, "tensor": 4}
    assert p["params"] == config.num_params()
    assert p["weights_total"] == config.num_params() * 2  # bf16
    for key in ("weights_per_device", "kv_cache_per_device", "temp_per_device", "needed_per_device"):
        assert p[key] > 0, key
    for phase in ("prefill", "decode"):
        # what the compiler was given per device = our sharded weights + cache + token ids
        tokens = p[phase]["argument"] - p["weights_per_device"] - p["kv_cache_per_device"]
        assert 0 < tokens <= 8 * p["prompt"] * 4 * 2, (phase, tokens)
        assert p[phase]["alias"] == p["kv_cache_per_device"]  # the donated cache is updated in place
        assert p[phase]["compile_seconds"] < 60
    # tiny has 2 KV heads: not divisible by tensor=4, so the cache splits only by batch (fsdp=2)
    assert p["kv_head_shards"] == 1 and p["kv_batch_shards"] == 2
    assert p["kv_cache_per_device"] * 2 == p["kv_cache_total"]
    assert p["fits"] is True and p["max_cached_tokens"] > 8 * 256
    # the whole context is prefilled as the model does it: chunks of the model's own size, blockwise attention
    assert p["prompt"] == 256 and p["chunk"] == min(256, DEFAULT_PREFILL_CHUNK) and p["attention"] == "blockwise"


def test_eight_b_on_eight_devices_splits_weights_eight_ways():
    p = plan_report.plan_subprocess(
        ["--config", "llama3_1_8b", "--preset", "h100x8", "--batch", "8", "--context", "8192"]
    )
    assert p["mesh"]["tensor"] == 8 and p["devices"] == 8
    assert p["weights_total"] == 16_060_522_496  # meta-llama/Llama-3.1-8B's safetensors index total_size
    # only the norms are replicated (a few hundred KB); everything else is split 8 ways
    assert p["weights_per_device"] == pytest.approx(p["weights_total"] / 8, rel=0.001)
    assert 0 < p["weights_replicated_per_device"] < 1 << 20
    # 8 KV heads on tensor=8: 131,072 B per token over 8 devices
    assert p["kv_bytes_per_token_per_device"] == 131_072 // 8
    assert p["kv_cache_per_device"] == 8 * 8192 * 131_072 // 8
    assert p["decode"]["argument"] > p["weights_per_device"] + p["kv_cache_per_device"]
    # tensor parallelism in decode: two activation all-reduces per layer, no weight gathers
    assert set(p["decode"]["collectives"]) <= {"all-reduce", "all-gather", "all-to-all", "collective-permute"}
    assert p["decode"]["collectives"].get("all-gather", 0) < 1 << 20
    assert p["fits"] is True and p["device_memory"] == 80 * GIB and p["budget"] == int(0.9 * 80 * GIB)


def test_fp8_weights_follow_the_405b_release_layout():
    """FP8 bytes from the model's own FP8 parameters, sharded over 8 devices (no compile needed)."""
    config = model_config_from_file("llama3_1_405b")
    spec = placement.sharding_spec(mesh_lib.make_mesh("tensor=8"))
    fp8 = quant.Fp8Spec(tuple(range(1, config.n_layers - 1)), matmul="fp8")
    _, state = placement.abstract_state(config, Options(fp8=fp8, sharding=spec), jnp.bfloat16)
    got = plan.weight_bytes(state)
    d, f, L = config.dim, config.ffn_dim, config.n_layers
    ffn = 3 * d * f
    bf16 = config.num_params() * 2
    # the release: FFNs of layers 1..L-2 at 1 byte + one f32 scale per output channel (2F + D)
    release = bf16 - (L - 2) * ffn + (L - 2) * (2 * f + d) * 4
    # the model also keeps FP8 slots (zeros) for layers 0 and L-1, whose bf16 FFNs live in dense_ffn
    assert got["total"] == release + 2 * ffn + 2 * (2 * f + d) * 4
    assert release / 1e9 == pytest.approx(487.3, abs=0.1)
    assert got["per_device"] == pytest.approx(got["total"] / 8, rel=0.001)


def test_collective_bytes_count_the_layer_loop_per_layer():
    hlo = "\n".join(
        [
            '%a = bf16[4,1024]{1,0} all-reduce(%x), metadata={op_name="jit(f)/while/body/closed_call/dot"}',
            '%b = (f32[8,16]{1,0}, f32[8,16]{1,0}) all-to-all(%y, %z), metadata={op_name="jit(f)/gather"}',
            '%c = f32[2,1024]{1,0} all-gather-start(%w), metadata={op_name="jit(f)/while/body/x"}',
            "%d = f32[2,1024]{1,0} all-gather-done(%c)",
            "%e = f32[2,1024]{1,0} add(%c, %c)",
        ]
    )
    assert plan.collective_bytes(hlo, n_layers=10) == {
        "all-reduce": 4 * 1024 * 2 * 10,
        "all-to-all": 2 * 8 * 16 * 4,
        "all-gather": 2 * 1024 * 4 * 10,
    }
    # counted at the model's bf16 width: XLA:CPU upcasts bf16 matmul operands before collectives
    assert plan.collective_bytes(hlo, n_layers=10, float_bytes=2)["all-gather"] == 2 * 1024 * 2 * 10


def test_a_plan_prints_as_its_verdict_and_a_table_of_bytes_per_device(tiny_plan):
    lines = plan_report.format_plan(tiny_plan).splitlines()
    assert lines[0].startswith("tiny (") and lines[0].endswith("on cpu: mesh fsdp=2,tensor=4, strategy fsdp_tp")
    assert lines[1] == "compiled by: cpu (XLA:CPU estimate)"
    rows = {line[:40].strip(): line[40:].strip() for line in lines[5:11]}
    assert rows["weights"] == plan_report.human(tiny_plan["weights_per_device"])
    assert rows["needed"] == plan_report.human(tiny_plan["needed_per_device"])
    assert [line.split()[0] for line in lines[12:14]] == ["prefill", "decode"]
    assert lines[-1].startswith(f"fits: yes; room for {tiny_plan['max_cached_tokens']:,} cached tokens")


def test_report_regenerates_only_the_marked_table(tmp_path, tiny_plan):
    doc = tmp_path / "SHARDING.md"
    doc.write_text(
        f"# Title\n\nprose before\n\n{plan_report.TABLE_BEGIN}\nold table\n{plan_report.TABLE_END}\n\nprose after\n"
    )
    plan_report.write_report(doc, results=[("tiny on 8 CPUs", tiny_plan)])
    text = doc.read_text()
    assert text.startswith("# Title\n\nprose before\n\n") and text.endswith("\n\nprose after\n")
    assert "old table" not in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny on 8 CPUs"))
    assert "fsdp=2,tensor=4" in row and "| yes |" in row
    assert (tmp_path / "SHARDING.plans.json").is_file()


# (arguments, the one-line error naming the value and what it may be)
ARGUMENT_ERRORS = [
    (["--preset", "a100x8"], "plan: error: --preset: unknown hardware preset 'a100x8'; known: ['cpu', 'h100x1'"),
    (["--preset", "h100x8", "--mesh", "tensor=4"], "plan: error: --mesh data=1,fsdp=1,kv_rep=1,tensor=4 has 4 devices"),
    (["--mesh", "fsdp=2,bogus=4"], "plan: error: --mesh: mesh axes ['bogus'] unknown; the axes are ('data', 'fsdp'"),
    (["--mesh", "fsdp=x"], "plan: error: --mesh: mesh 'fsdp=x': expected name=size pairs like 'data=2,tensor=4'"),
    (["--preset", "h100x8", "--mesh", "fsdp=-1,tensor=3"], "8 devices are not divisible by 3"),
    (["--mesh", "fsdp=-1"], "plan: error: --mesh: 'fsdp=-1' has -1, which needs --preset"),
    ([], "plan: error: give --mesh, --preset or both"),
]


@pytest.mark.parametrize(("argv", "message"), ARGUMENT_ERRORS)
def test_a_bad_argument_is_one_error_line_naming_it(argv, message, capsys):
    from llama_jax import cli

    assert cli.main(["plan", "--config", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

"""The job commands README.md and docs/GETTING_STARTED.md show run as written on one CPU device.

Each documented `python -m llama_jax train|batch|rejection ...` line (optional `[...]` parts and `#`
comments left out) is parsed by the CLI and built into its job's settings, exactly as the job would
build them; its mesh must then resolve on one device. The job presets' meshes span the devices present:
one here, all eight on a GPU node.
"""

import math
import pathlib
import re
import shlex

import pytest

from llama_jax.cli import build_parser
from llama_jax.jobs import jobs
from llama_jax.jobs.batch import JobConfig
from llama_jax.jobs.rejection import RejectionConfig
from llama_jax.jobs.train import TrainJob
from llama_jax.model.config import load_config_file
from llama_jax.sharding.mesh import resolve_axes

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/GETTING_STARTED.md")
SETTINGS = {"train": TrainJob, "batch": JobConfig, "rejection": RejectionConfig}
COMMAND = re.compile(r"python -m llama_jax (train|batch|rejection) ([^`#\\]*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for number, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            for match in COMMAND.finditer(line):
                options = re.sub(r"\[[^\]]*\]", "", match.group(2))
                if "..." not in options:
                    found.append((f"{doc}:{number}", match.group(1), shlex.split(options)))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_every_job_command():
    assert {command for _, command, _ in COMMANDS} == set(SETTINGS)
    assert any("--config" in argv for _, _, argv in COMMANDS)


JOB_PRESETS = {"batch": JobConfig, "rejection": RejectionConfig, "finetune_lora": TrainJob, "finetune_sft": TrainJob}
JOB_PRESETS |= {"distill": TrainJob, "dpo": TrainJob}


@pytest.mark.parametrize("preset", sorted(JOB_PRESETS))
def test_every_job_preset_spans_the_devices_present(preset):
    job = jobs.config_from_mapping(JOB_PRESETS[preset], load_config_file(preset).to_dict(), source=preset)
    assert math.prod(resolve_axes(job.mesh or "data=1", 1).values()) == 1
    if job.mesh is not None:  # the batch template's None is one device, wherever it runs
        assert math.prod(resolve_axes(job.mesh, 8).values()) == 8


@pytest.mark.parametrize("where, command, argv", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_a_documented_job_command_is_valid_on_one_cpu_device(where, command, argv):
    args = build_parser(command).parse_args([command, *argv])
    job = jobs.config_from_args(SETTINGS[command], args)
    assert math.prod(resolve_axes(job.mesh or "data=1", 1).values()) == 1, where
    if command == "train":
        job.train_config()  # the optimizer settings' own checks

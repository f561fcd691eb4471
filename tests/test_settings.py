"""Each setting is declared once, and every place that offers it is derived from that declaration.

A setting (a dataclass field made by `llama_jax.model.settings.setting`) carries its type, default, help, flag
and whether a batch request may set it. These tests walk the declarations of every command that takes
settings and check each one where a user meets it: a flag of that command with the declared default,
a field of the job's `--config` preset, a field a request line may set (reaching the request's
`SamplingParams`), and a row of the docs' table.
"""

import argparse
import dataclasses
import json
import pathlib
import typing

import pytest

from llama_jax import cli
from llama_jax.inference.sampling import LOGPROBS_MODES, SamplingParams
from llama_jax.jobs import jobs
from llama_jax.jobs.batch import REQUEST_FIELDS, JobConfig
from llama_jax.jobs.batch_files import SAMPLING_FIELDS, BadLine, Reader
from llama_jax.jobs.rejection import RejectionConfig
from llama_jax.jobs.train import TrainConfig, TrainJob
from llama_jax.model import settings
from llama_jax.model.config import load_config_file, model_config_from_file

ROOT = pathlib.Path(__file__).resolve().parents[1]

# command -> (the classes declaring its settings, the arguments it needs besides them, its --config preset)
COMMANDS = {
    "generate": ((cli.ModelOptions, cli.GenerateSampling), ["--prompt", "x"], None),
    "chat": ((cli.ModelOptions, cli.ChatSampling), [], None),
    "batch": ((JobConfig,), [], "batch"),
    "rejection": ((RejectionConfig,), [], "rejection"),
    "train": ((TrainJob,), [], None),
}
JOBS = ("batch", "rejection", "train")  # settings from defaults < --config < options, each --config.<field>
# Values the type allows that a job's own checks would refuse as the other value.
OTHER = {
    "objective": "dpo",
    "dpo_loss": "ipo",
    "lora_targets": ("w1", "w2"),
    "json_schema": '{"type": "string"}',
    "choice": ("yes", "no"),
}
SETTINGS = [
    (command, cls, name)
    for command, (classes, _, _) in COMMANDS.items()
    for cls in classes
    for name in settings.declared(cls)
]


def other_value(kind, default, name=""):
    """A valid value of the field's type that is not its default."""
    base = settings._base(kind)
    if name in OTHER:
        return OTHER[name]
    if base is bool:
        return not default
    if base is int:
        return 2 * default if default else 2
    if base is float:
        return default / 2 if default else 0.25
    if default in LOGPROBS_MODES:  # a choice among names
        return next(mode for mode in LOGPROBS_MODES if mode != default)
    return "other"


def as_flag(value) -> str:
    """A value as a flag takes it."""
    return ",".join(value) if isinstance(value, tuple) else str(value)


def parse(command: str, *options: str):
    (cls, *_), needed, _ = COMMANDS[command]
    args = cli.build_parser(command).parse_args([command, *needed, *options])
    if command in ("generate", "chat"):
        return args
    return jobs.config_from_args(cls, args)


@pytest.mark.parametrize("command, cls, name", SETTINGS, ids=[f"{c}-{n}" for c, _, n in SETTINGS])
def test_every_setting_is_a_flag_of_its_command_with_the_declared_default(command, cls, name):
    field = settings.declared(cls)[name]
    flag = settings.flag(cls, name)
    assert getattr(parse(command), name) == field.default
    value = other_value(typing.get_type_hints(cls)[name], field.default, name)
    if flag is None:
        assert command in JOBS  # a job field without a flag is still --config.<field>
    elif isinstance(value, bool):
        assert flag == f"--{'no-' if field.default else ''}{name.replace('_', '-')}"
        assert getattr(parse(command, flag), name) == value
    else:
        assert getattr(parse(command, flag, as_flag(value)), name) == value
    if command in JOBS:
        assert getattr(parse(command, f"--config.{name}={as_flag(value)}"), name) == value


@pytest.mark.parametrize("command", ["batch", "rejection"])
def test_every_job_setting_is_a_field_of_its_preset(command):
    (cls,), _, preset = COMMANDS[command]
    config = load_config_file(preset).to_dict()
    assert set(config) == {f.name for f in dataclasses.fields(cls)}
    if command == "batch":  # the template: every default as declared
        assert config == {f.name: f.default for f in dataclasses.fields(cls)}


def test_a_shared_setting_is_its_source_declaration_with_the_commands_default():
    """A command that offers another class's setting keeps its type, help, flag and request-ness."""
    sources = {cli.GenerateSampling: SamplingParams, cli.ChatSampling: SamplingParams, RejectionConfig: JobConfig}
    sources |= {JobConfig: SamplingParams, cli.ModelOptions: jobs.ModelSettings, TrainJob: jobs.ModelSettings}
    for cls, source in sources.items():
        own, theirs = settings.declared(cls), settings.declared(source)
        shared = [name for name in own if name in theirs and own[name].metadata == theirs[name].metadata]
        assert shared, cls
        for name in shared:
            assert typing.get_type_hints(cls)[name] == typing.get_type_hints(source)[name]
    sampling = [classes[-1] for classes, _, _ in COMMANDS.values() if "temperature" in settings.declared(classes[-1])]
    assert {settings.flag(cls, "temperature") for cls in sampling} == {"--temperature"}
    assert {settings.flag(classes[0], "fp8_matmul") for classes, _, _ in COMMANDS.values()} == {"--fp8-matmul"}
    assert [cli.GenerateSampling().max_new_tokens, cli.ChatSampling().max_new_tokens] == [64, 256]
    assert (JobConfig().temperature, JobConfig().top_p) == (0.6, 0.9)  # Meta's chat defaults
    assert (RejectionConfig().temperature, RejectionConfig().top_p, RejectionConfig().n) == (0.8, 0.95, 4)


@pytest.fixture(scope="module")
def reader(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("settings") / "in.jsonl"
    path.write_text("")
    return Reader(path, tokenizer, model_config_from_file("llama3_2_1b"), JobConfig(), done={})


def test_every_per_request_setting_is_a_request_field_that_reaches_the_request(reader):
    per_request = settings.request_fields(JobConfig)
    assert set(per_request) == {*SAMPLING_FIELDS, "seed", "n"}
    assert REQUEST_FIELDS == {"id", "prompt", "messages", *per_request}
    hints = typing.get_type_hints(JobConfig)
    for number, name in enumerate(per_request, 1):
        value = other_value(hints[name], getattr(JobConfig(), name), name)
        request = reader._parse(number, json.dumps({"id": name, "prompt": "hi", name: value}).encode())
        if name == "n":
            assert [sample_id for sample_id, _ in request.samples] == [f"{name}#{k}" for k in range(value)]
        elif name == "seed":
            assert request.samples == ((name, value),)
        else:
            assert getattr(request.sampling, name) == value
    with pytest.raises(BadLine, match=r"unknown field\(s\) \['rules'\]"):
        reader._parse(99, json.dumps({"id": 99, "prompt": "hi", "rules": "dp"}).encode())


DOCS_TABLES = [("docs/BATCH.md", JobConfig), ("docs/TRAINING.md", RejectionConfig), ("docs/TRAINING.md", TrainJob)]


@pytest.mark.parametrize("doc, cls", DOCS_TABLES)
def test_the_docs_table_of_settings_is_the_declarations(doc, cls):
    text = (ROOT / doc).read_text()
    table = settings.markdown_table(cls)
    header = table.splitlines()[0]
    start = text.index(header)
    shown = text[start : text.index("\n\n", start) + 1]
    assert shown == table, f"{doc}: replace the table with settings.markdown_table({cls.__name__}):\n{table}"


def test_every_field_of_a_job_is_a_declared_setting():
    """A field without a declaration would have no help, no flag and no docs row: a job refuses it."""

    @dataclasses.dataclass(frozen=True)
    class Job(jobs.ModelSettings):
        extra: int = 0

    with pytest.raises(TypeError, match=r"Job: every field of a job is a setting .* not \['extra'\]"):
        settings.add_config_arguments(argparse.ArgumentParser(), Job)
    assert set(settings.declared(TrainJob)) == {f.name for f in dataclasses.fields(TrainJob)}
    assert set(settings.declared(TrainConfig)) < set(settings.declared(TrainJob))

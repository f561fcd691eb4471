"""Settings declared once: a dataclass field carries its type, default, help, flag and whether a request may set it.

    @settings.declare(SamplingParams, "top_k", "seed", max_new_tokens=256)   # shared fields, this job's defaults
    class JobConfig:
        input: str | None = settings.setting(None, "JSONL requests", flag=True)

Everything else is derived from the declarations: the CLI options (`add_options` for a command's plain
flags, `add_config_arguments` for a job's `--config NAME|FILE` and `--config.<field>`), a job's settings
from its three layers (`config_from_args`: defaults < `--config` file < options given), the
ml-collections presets (`config_dict`), the fields a batch request line may set (`request_fields`) and
the docs' tables (`markdown_table`). A sampling setting is declared on `SamplingParams` alone; a job
that offers it names it in `declare` with its own default.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

__all__ = [
    "add_config_arguments",
    "add_options",
    "config_dict",
    "config_from_args",
    "config_from_mapping",
    "declare",
    "flag",
    "markdown_table",
    "request_fields",
    "setting",
]

_KEY = "llama_jax.setting"


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a field declares besides its type and default."""

    help: str
    flag: str | None  # the plain command-line flag ("--top-p"), besides --config.<field>; None: none
    request: bool  # a batch request line may set it (its own value over the job's)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: bool | str = False, request: bool = False):
    """A dataclass field declaring a setting. `flag=True` gives it the plain flag `--<name with dashes>`
    (a bool: `--<name>` sets it when it defaults to false, `--no-<name>` clears it when true), a string
    names another flag; `request` lets a batch request line set it."""
    return dataclasses.field(default=default, metadata={_KEY: (help, flag, request)})


def declared(cls) -> dict[str, dataclasses.Field]:
    """The settings of dataclass `cls` (fields made by `setting`), in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if _KEY in f.metadata}


def info(field: dataclasses.Field) -> Setting:
    help, flag_, request = field.metadata[_KEY]
    if flag_ is True:
        dashed = field.name.replace("_", "-")
        flag_ = f"--{dashed}" if field.type not in (bool, "bool") else f"--{'no-' if field.default else ''}{dashed}"
    return Setting(help, flag_ or None, request)


def flag(cls, name: str) -> str | None:
    """The plain flag of setting `name` of `cls` ("--top-p"), None if it has none."""
    return info(declared(cls)[name]).flag


def request_fields(cls) -> tuple[str, ...]:
    """The settings of `cls` that a batch request line may set."""
    return tuple(name for name, field in declared(cls).items() if info(field).request)


def declare(source=None, *shared: str, **defaults: Any):
    """Class decorator: a frozen dataclass of the class's own fields, followed by the settings of `source`
    named in `shared` (with `source`'s default) or in `defaults` (with this default), each keeping its
    declaration there (type, help, flag, request)."""

    def make(cls):
        fields = declared(source) if source is not None else {}
        hints = typing.get_type_hints(source) if source is not None else {}
        annotations = cls.__dict__.get("__annotations__", {})
        cls.__annotations__ = annotations
        unknown = sorted({*shared, *defaults} - set(fields))
        if unknown:
            raise TypeError(f"{cls.__name__}: {source.__name__} declares no setting {unknown}")
        for name in [name for name in fields if name in shared or name in defaults]:  # in `source`'s order
            default = defaults.get(name, fields[name].default)
            annotations[name] = hints[name]
            setattr(cls, name, dataclasses.field(default=default, metadata=fields[name].metadata))
        return dataclasses.dataclass(frozen=True)(cls)

    return make


# ---- the command line -----------------------------------------------------------------------------------


def _base(kind):
    """The type a flag parses for a field: its first type but None (`int | tuple[int, ...]`: int; a job
    gives one seed), `tuple[str, ...]` → tuple."""
    args = [t for t in typing.get_args(kind) if t is not type(None)]
    if typing.get_origin(kind) in (typing.Union, _UnionType) and args:
        kind = args[0]
    return typing.get_origin(kind) or kind


_UnionType = type(int | None)


def _parse_value(kind, name: str):
    """An argparse `type` for a field: its type, "none" for optional ones, true/false for bools, a,b,c for tuples."""
    optional = type(None) in typing.get_args(kind)
    base = _base(kind)

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise argparse.ArgumentTypeError(f"{name}: expected true or false, got {text!r}")
            return text.lower() in ("true", "1")
        if base is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected {base.__name__}, got {text!r}") from None

    return parse


def _add_flag(parser, field: dataclasses.Field, kind, default, *extra: str) -> None:
    """The plain flag of `field` (and the `extra` option strings), with `default` (SUPPRESS: none)."""
    about = info(field)
    text = about.help.replace("%", "%%")
    names = [about.flag] if about.flag else []
    if about.flag and _base(kind) is bool:  # a switch, and --config.<field>=true|false beside it
        parser.add_argument(
            about.flag, dest=field.name, action="store_const", const=not field.default, default=default, help=text
        )
        names = []
    if names or extra:
        shown = "none" if field.default is None else repr(field.default)
        help_text = f"{text} (default {shown})" if text else f"default {shown}"
        parser.add_argument(
            *names, *extra, dest=field.name, type=_parse_value(kind, field.name), default=default, help=help_text
        )


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """The plain flags of `cls`'s settings, each defaulting to its declared default (a command's options)."""
    hints = typing.get_type_hints(cls)
    for name, field in declared(cls).items():
        _add_flag(parser, field, hints[name], field.default)


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """`--config NAME|FILE`, and `--config.<field>` and the declared plain flag of every field of `cls`, each
    a setting. Nothing given keeps the field out of the namespace, so `config_from_args` layers the
    defaults, the file and the options given."""
    undeclared = [f.name for f in dataclasses.fields(cls) if f.name not in declared(cls)]
    if undeclared:
        raise TypeError(f"{cls.__name__}: every field of a job is a setting (settings.setting); not {undeclared}")
    parser.add_argument("--config", help="the job's get_config(): a packaged preset's name or a .py file")
    hints = typing.get_type_hints(cls)
    for name, field in declared(cls).items():
        _add_flag(parser, field, hints[name], argparse.SUPPRESS, f"--config.{name}")


def config_from_mapping(cls, values: Mapping[str, Any], *, source: str):
    """`cls(**values)`, refusing unknown fields by name (a typo must not silently keep a default)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {k: tuple(v) if _base(hints[k]) is tuple and isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def config_from_args(cls, args: argparse.Namespace):
    """The dataclass's defaults, overridden by `--config FILE`, overridden by the options given."""
    from llama_jax.model.config import load_config_file

    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(load_config_file(args.config).to_dict())
    config = config_from_mapping(cls, values, source=str(args.config))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return dataclasses.replace(config, **given)


# ---- presets and docs -----------------------------------------------------------------------------------


def config_dict(cls, **values: Any):
    """An ml-collections `get_config()` of every field of `cls`: its defaults, with `values` over them."""
    import ml_collections

    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return ml_collections.ConfigDict(
        dataclasses.asdict(config_from_mapping(cls, defaults | values, source=cls.__name__))
    )


def _cell(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):  # as the flag takes it
        value = ",".join(map(str, value))
    return f"`{value}`" if isinstance(value, str) else str(value)


def markdown_table(cls) -> str:
    """The docs' table of `cls`'s settings: field, flag, default, per request (where any is), what it is."""
    fields = declared(cls)
    per_request = any(info(field).request for field in fields.values())  # else no such column
    columns = ["field", "flag", "default", *(["per request"] if per_request else [])]
    rows = ["| " + " | ".join(columns) + " | |", "|---" * (len(columns) + 1) + "|"]
    for name, field in fields.items():
        about = info(field)
        cells = [f"`{name}`", f"`{about.flag}`" if about.flag else "", _cell(field.default)]
        cells += ["yes" if about.request else ""] if per_request else []
        rows.append("| " + " | ".join([*cells, about.help.replace("|", "&#124;")]) + " |")
    return "\n".join(rows) + "\n"

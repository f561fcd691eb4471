"""Llama 3.1 tool calls: validating one, the text the model emits for it, finding one in a reply;
custom tool definitions and the schema of a call to one.

Meta's llama-models `llama3/tool_utils.py` (encoding and extracting tool calls). The prompts that announce
tools (Meta's `llama3/prompt_templates/system_prompts.py`) are `llama_jax.text.tool_prompts`;
`llama_jax.text.chat` puts these pieces into token ids and message dicts.

A tool call is `{"function": {"name": str, "arguments": dict}}` (or flat `{"name", "arguments"}`);
`parse_tool_call` validates one into a `ToolCall`. Builtin tools are called as
`name.call(query="...")` (code_interpreter: raw code after `<|python_tag|>`); custom tools in one of
three formats (`ToolFormat`).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BUILTIN_TOOLS",
    "TOOL_FORMATS",
    "CustomTool",
    "ToolCall",
    "ToolFormat",
    "ToolParam",
    "expect_str",
    "find_tool_call",
    "parse_custom_tool",
    "parse_tool_call",
    "reject_unknown_keys",
    "render_tool_call",
    "tool_call_schema",
]

ToolFormat = Literal["json", "function_tag", "python_list"]
TOOL_FORMATS = ("json", "function_tag", "python_list")
# Tools the Llama 3.1 models were trained to call as `name.call(query="...")` (code_interpreter: raw code).
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
_TOOL_CALL_META_KEYS = {"id", "type", "call_id"}  # OpenAI-style bookkeeping, not part of the prompt

# Meta's patterns (llama-models `llama3/tool_utils.py`), kept verbatim because they define what parses:
# the function-tag arguments stop at the first "}", and builtin queries cannot contain '"'.
_BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")


@dataclass(frozen=True)
class ToolCall:
    """One validated tool call of an assistant message."""

    name: str
    arguments: Mapping[str, Any]


# ----------------------------------------------------------------------------------------------
# Tool calls: validation and the text the model emits


def parse_tool_call(call: Any, where: str) -> ToolCall:
    """A message's tool call, validated; errors name `where` and the field (builtins need their argument)."""
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(call).__name__}")
    if "function" in call:
        reject_unknown_keys(call, {"function"} | _TOOL_CALL_META_KEYS, where)
        body, where = call["function"], f"{where}.function"
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}: expected a dict with 'name' and 'arguments', got {type(body).__name__}")
        reject_unknown_keys(body, {"name", "arguments"}, where)
    else:
        body = call
        reject_unknown_keys(body, {"name", "arguments"} | _TOOL_CALL_META_KEYS, where)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty str, got {name!r}")
    arguments = body.get("arguments")
    if not isinstance(arguments, Mapping):
        raise ValueError(f"{where}.arguments: expected a dict, got {type(arguments).__name__}")
    required = "code" if name == "code_interpreter" else "query" if name in _QUERY_TOOLS else None
    if required is not None and required not in arguments:
        raise ValueError(f"{where}.arguments.{required}: missing; {name} calls are rendered from it")
    if name == "code_interpreter":
        expect_str(arguments["code"], f"{where}.arguments.code")
    return ToolCall(name=name, arguments=dict(arguments))


def reject_unknown_keys(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """Raise on any key outside `allowed`: an unknown key in a message is most likely a typo."""
    unknown = set(mapping) - allowed
    if unknown:
        raise ValueError(f"{where}: unexpected key(s) {sorted(unknown)}; expected only {sorted(allowed)}")


def expect_str(value: Any, where: str) -> str:
    """`value` if it is a str, else a ValueError naming `where`."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected str, got {type(value).__name__}")
    return value


def render_tool_call(call: ToolCall, tool_format: ToolFormat = "json") -> str:
    """The text the model emits for `call` (Meta's `ToolUtils.encode_tool_call`)."""
    if call.name in _QUERY_TOOLS:
        return f'{call.name}.call(query="{call.arguments["query"]}")'
    if call.name == "code_interpreter":
        return call.arguments["code"]
    if tool_format == "json":
        return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})
    if tool_format == "function_tag":
        return f"<function={call.name}>{json.dumps(call.arguments)}</function>"
    if tool_format == "python_list":
        args = ", ".join(f"{key}={_python_list_value(value)}" for key, value in call.arguments.items())
        return f"[{call.name}({args})]"
    raise ValueError(f"tool_format: expected one of {TOOL_FORMATS}, got {tool_format!r}")


def _python_list_value(value: Any) -> str:
    # Meta's format_value: strings always double-quoted (no escaping), dicts as `{k=v}`.
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, list):
        return f"[{', '.join(_python_list_value(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_list_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"python_list tool calls cannot render a {type(value).__name__} argument")


# ----------------------------------------------------------------------------------------------
# Finding a call in a model reply (Meta's `ToolUtils`)


class _NoCall:
    """Marker: the body names a custom tool but has null parameters, which Meta reads as no call."""


def find_tool_call(body: str, ipython: bool) -> ToolCall | None:
    """The one tool call in a reply's body, looked for in Meta's order (see `chat.parse_assistant_text`);
    `ipython`: the reply opened with `<|python_tag|>`, so a body with no other call is code."""
    custom = _custom_tool_call(body)
    if isinstance(custom, _NoCall):
        return None
    if custom is not None:
        return custom
    builtin = _BUILTIN_CALL.search(body)
    if builtin:
        return ToolCall(builtin["tool_name"], {"query": builtin["query"]})
    if ipython:
        return ToolCall("code_interpreter", {"code": body})
    return None


def _custom_tool_call(body: str) -> ToolCall | _NoCall | None:
    """Meta's `maybe_extract_custom_tool_call`, returning None wherever Meta would crash."""
    tagged = _FUNCTION_TAG_CALL.search(body)
    if tagged:
        arguments = _json_object(tagged["args"].replace("'", '"'))
        name = tagged["function_name"]
    elif (obj := _json_object(body)) is not None:
        if obj.get("type") != "function" and "name" not in obj:
            return None
        if "parameters" not in obj:
            return None
        name, arguments = obj.get("name"), obj["parameters"]
        if isinstance(name, str) and arguments is None:
            return _NoCall()
    elif _is_keyword_call_list(body):
        name, arguments = _first_keyword_call(body)
    else:
        return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    if name in BUILTIN_TOOLS:
        # The model sometimes calls a builtin in the custom format; Meta keeps only the first value.
        if not arguments:
            return None
        arguments = {"query": next(iter(arguments.values()))}
    return ToolCall(name, arguments)


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_keyword_call_list(text: str) -> bool:
    """True for `[f(a=1), g()]`: a non-empty list literal of calls to plain names, keywords only."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return False
    expr = tree.body[0].value
    return (
        isinstance(expr, ast.List)
        and bool(expr.elts)
        and all(isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args for call in expr.elts)
    )


def _first_keyword_call(text: str) -> tuple[str | None, dict[str, Any] | None]:
    call = ast.parse(text).body[0].value.elts[0]
    try:
        # `**kwargs` has no name (arg is None): not a call we could forward.
        if any(keyword.arg is None for keyword in call.keywords):
            return None, None
        return call.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None, None


# ----------------------------------------------------------------------------------------------
# Custom tools: their definitions, and the schema of a call to one


@dataclass(frozen=True)
class ToolParam:
    """One parameter of a custom tool's definition."""

    name: str
    param_type: str
    description: str
    required: bool


@dataclass(frozen=True)
class CustomTool:
    """A custom tool's definition, validated (`parse_custom_tool`)."""

    name: str
    description: str
    params: tuple[ToolParam, ...]


def parse_custom_tool(tool: Mapping[str, Any], where: str) -> CustomTool:
    """`tool` (a dict, see `tool_prompts.custom_tools_message`) validated; errors name `where` and the field."""
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where}: expected a dict with 'name', 'description' and 'parameters'")
    name = tool.get("name", tool.get("tool_name"))
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty str, got {name!r}")
    if name in BUILTIN_TOOLS:
        raise ValueError(f"{where}.name: {name!r} is a builtin tool; pass it in builtin_tools")
    description = expect_str(tool.get("description") or "", f"{where}.description")
    parameters = tool.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where}.parameters: expected a dict of parameter name -> definition")
    return CustomTool(
        name=name,
        description=description,
        params=tuple(_parse_param(pname, p, f"{where}.parameters.{pname}") for pname, p in parameters.items()),
    )


def _parse_param(name: str, param: Any, where: str) -> ToolParam:
    if not isinstance(param, Mapping) or not isinstance(param.get("param_type"), str):
        raise ValueError(f"{where}: expected a dict with a str 'param_type', got {param!r}")
    required = param.get("required", True)
    if not isinstance(required, bool):
        raise ValueError(f"{where}.required: expected bool, got {required!r}")
    description = expect_str(param.get("description") or "", f"{where}.description")
    return ToolParam(name=name, param_type=param["param_type"], description=description, required=required)


# JSON-schema types of the `param_type`s tool definitions use (Meta's examples write "str", "int").
_PARAM_TYPES = {
    "str": "string",
    "int": "integer",
    "float": "number",
    "bool": "boolean",
    "list": "array",
    "dict": "object",
}
_PARAM_TYPES |= {t: t for t in ("string", "integer", "number", "boolean", "array", "object")}


def tool_call_schema(custom_tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The JSON schema of a call, in the json tool format (`render_tool_call`), of one of `custom_tools`
    with its required parameters (typed where `param_type` names a JSON type). A request whose
    `json_schema` it is (`llama_jax.inference.constrain`) replies with a call `find_tool_call` always parses."""
    tools = [parse_custom_tool(tool, f"custom_tools[{i}]") for i, tool in enumerate(custom_tools)]
    if not tools:
        raise ValueError("custom_tools: expected at least one tool")
    calls = []
    for tool in tools:
        properties = {
            p.name: {"type": _PARAM_TYPES[p.param_type]} if p.param_type in _PARAM_TYPES else {} for p in tool.params
        }
        parameters = {
            "type": "object",
            "properties": properties,
            "required": [p.name for p in tool.params if p.required],
            "additionalProperties": False,
        }
        calls.append(
            {
                "type": "object",
                "properties": {"type": {"const": "function"}, "name": {"const": tool.name}, "parameters": parameters},
                "required": ["type", "name", "parameters"],
                "additionalProperties": False,
            }
        )
    return calls[0] if len(calls) == 1 else {"anyOf": calls}

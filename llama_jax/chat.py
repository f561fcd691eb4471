"""Llama 3.1 chat format: dialogs to token ids, tool-calling prompts, and model replies back to messages.

Messages are plain dicts, as most chat APIs use them:

    {"role": "system" | "user" | "assistant" | "tool" | "ipython", "content": str}

A user message may carry `"context"` (Meta's RAG field); an assistant message may carry
`"tool_calls": [{"function": {"name": str, "arguments": dict}}]` (or flat `{"name", "arguments"}`) and
`"stop_reason": "end_of_turn" | "end_of_message" | "out_of_tokens"`.

The token layout is exactly Meta's `ChatFormat.encode_dialog_prompt` (llama-models 0.3.0) and the
parsing of replies exactly its `decode_assistant_message` on well-formed input; see
`parse_assistant_text` for what happens where Meta's parser crashes.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llama_jax.tokenizer import Tokenizer

__all__ = [
    "BUILTIN_TOOLS",
    "ChatFormat",
    "custom_tools_message",
    "parse_assistant_text",
    "system_prompt",
    "tool_prompt_messages",
]

ToolFormat = Literal["json", "function_tag", "python_list"]
Message = Mapping[str, Any]

ROLES = ("system", "user", "assistant", "tool", "ipython")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")
# Tools the Llama 3.1 models were trained to call as `name.call(query="...")` (code_interpreter: raw code).
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
_QUERY_TOOLS = ("brave_search", "wolfram_alpha", "photogen")
_TOOL_FORMATS = ("json", "function_tag", "python_list")

# Keys a message may carry besides role and content, per role; anything else is most likely a typo.
_EXTRA_KEYS = {"user": {"context"}, "assistant": {"tool_calls", "stop_reason"}}
_TOOL_CALL_META_KEYS = {"id", "type", "call_id"}  # OpenAI-style bookkeeping, not part of the prompt

_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_PYTHON_TAG = "<|python_tag|>"
_END_TOKENS = (("<|eot_id|>", "end_of_turn"), ("<|eom_id|>", "end_of_message"))
_CHAT_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# Meta's patterns (llama-models `llama3/tool_utils.py`), kept verbatim because they define what parses:
# the function-tag arguments stop at the first "}", and builtin queries cannot contain '"'.
_BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")

_KNOWLEDGE_CUTOFF = "December 2023"
# Meta formats with strftime("%d %B %Y"); a fixed table keeps the prompt independent of the locale.
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip


@dataclass(frozen=True)
class _ToolCall:
    """One validated tool call of an assistant message."""

    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class _Message:
    """A validated message; `role` is already the header text ("tool" is rendered as "ipython")."""

    role: str
    content: str
    context: str | None = None
    tool_calls: tuple[_ToolCall, ...] = ()
    stop_reason: str | None = None


class ChatFormat:
    """Token ids of Llama 3 dialogs, and assistant replies parsed back into message dicts."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [t for t in _CHAT_SPECIAL_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"ChatFormat needs a Llama 3 tokenizer; this one lacks {', '.join(missing)}")
        self.tokenizer = tokenizer
        self._special = {name: tokenizer.special_tokens[name] for name in _CHAT_SPECIAL_TOKENS}

    def encode_dialog(self, messages: Sequence[Message], *, tool_format: ToolFormat = "json") -> list[int]:
        """bos, every message, then an open assistant header for the model to complete."""
        if isinstance(messages, (str, Mapping)):
            raise TypeError("encode_dialog expects a sequence of message dicts")
        ids = [self._special["<|begin_of_text|>"]]
        for index, message in enumerate(messages):
            ids += self._encode(_parse_message(message, f"messages[{index}]"), tool_format)
        return ids + self._header("assistant")

    def encode_message(self, message: Message, *, tool_format: ToolFormat = "json") -> list[int]:
        """Header, body and end token (`<|eom_id|>` or `<|eot_id|>`) of one message."""
        return self._encode(_parse_message(message, "message"), tool_format)

    def encode_completion(self, text: str) -> list[int]:
        """Prompt for plain (non-chat) completion: bos then the text."""
        return self.tokenizer.encode(text, bos=True, eos=False)

    def decode_assistant(self, tokens: Sequence[int], *, stop_reason: str = "out_of_tokens") -> dict[str, Any]:
        """Parse generated ids (optionally ending in eot/eom) into an assistant message dict."""
        return parse_assistant_text(self.tokenizer.decode(tokens), stop_reason=stop_reason)

    def stop_reason(self, stop_token: int | None) -> str:
        """Meta's stop reason for the token a generation stopped on: eot → "end_of_turn", eom →
        "end_of_message", anything else (no stop token, `<|end_of_text|>`) → "out_of_tokens"."""
        if stop_token is not None and stop_token == self.tokenizer.eot_id:
            return "end_of_turn"
        if stop_token is not None and stop_token == self.tokenizer.eom_id:
            return "end_of_message"
        return "out_of_tokens"

    def decode_result(self, result) -> dict[str, Any]:
        """`decode_assistant` of a `GenerationResult`: its tokens, and the stop reason its stop token gives.

        (`result.tokens` excludes the stop token, so eot vs eom, which tool calls depend on, is read
        from `result.stop_token`.)
        """
        return self.decode_assistant(result.tokens, stop_reason=self.stop_reason(result.stop_token))

    def _text(self, text: str) -> list[int]:
        # Special-token text in content stays text: users must not be able to forge headers.
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _header(self, role: str) -> list[int]:
        return [
            self._special["<|start_header_id|>"],
            *self._text(role),
            self._special["<|end_header_id|>"],
            *self._text("\n\n"),
        ]

    def _encode(self, message: _Message, tool_format: ToolFormat) -> list[int]:
        if tool_format not in _TOOL_FORMATS:
            raise ValueError(f"tool_format: expected one of {_TOOL_FORMATS}, got {tool_format!r}")
        ids = self._header(message.role)
        # Since llama-models b6dad01 only code is introduced by the python tag in prompts.
        if message.tool_calls and message.tool_calls[0].name == "code_interpreter":
            ids.append(self._special["<|python_tag|>"])
        # Each piece is encoded on its own, as Meta does: BPE never merges across these seams.
        ids += self._text(message.content)
        if message.context is not None:
            ids += self._text("\n\n") + self._text(message.context)
        for call in message.tool_calls:
            ids += self._text(_render_tool_call(call, tool_format))
        end = "<|eom_id|>" if message.stop_reason == "end_of_message" else "<|eot_id|>"
        return [*ids, self._special[end]]


def _render_tool_call(call: _ToolCall, tool_format: ToolFormat = "json") -> str:
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
    raise ValueError(f"tool_format: expected one of {_TOOL_FORMATS}, got {tool_format!r}")


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
# Message validation


def _parse_message(message: Message, where: str) -> _Message:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role: expected one of {ROLES}, got {role!r}")
    _reject_unknown_keys(message, {"role", "content"} | _EXTRA_KEYS.get(role, set()), where)
    if "content" not in message:
        raise ValueError(f'{where}.content: missing (use "" for an empty message)')
    content = _expect_str(message["content"], f"{where}.content")
    context = message.get("context")
    if context is not None:
        context = _expect_str(context, f"{where}.context")
    stop_reason = message.get("stop_reason")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise ValueError(f"{where}.stop_reason: expected one of {STOP_REASONS}, got {stop_reason!r}")
    calls = message.get("tool_calls") or ()
    if isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
        raise ValueError(f"{where}.tool_calls: expected a list of tool calls, got {type(calls).__name__}")
    return _Message(
        role="ipython" if role == "tool" else role,
        content=content,
        context=context,
        tool_calls=tuple(_parse_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)),
        stop_reason=stop_reason,
    )


def _parse_tool_call(call: Any, where: str) -> _ToolCall:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: expected a dict, got {type(call).__name__}")
    if "function" in call:
        _reject_unknown_keys(call, {"function"} | _TOOL_CALL_META_KEYS, where)
        body, where = call["function"], f"{where}.function"
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}: expected a dict with 'name' and 'arguments', got {type(body).__name__}")
        _reject_unknown_keys(body, {"name", "arguments"}, where)
    else:
        body = call
        _reject_unknown_keys(body, {"name", "arguments"} | _TOOL_CALL_META_KEYS, where)
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
        _expect_str(arguments["code"], f"{where}.arguments.code")
    return _ToolCall(name=name, arguments=dict(arguments))


def _reject_unknown_keys(mapping: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(mapping) - allowed
    if unknown:
        raise ValueError(f"{where}: unexpected key(s) {sorted(unknown)}; expected only {sorted(allowed)}")


def _expect_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected str, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------
# Parsing model replies


def parse_assistant_text(text: str, *, stop_reason: str = "out_of_tokens") -> dict[str, Any]:
    """Decoded model output -> `{"role": "assistant", "content", "tool_calls", "stop_reason"}`.

    Follows Meta's `decode_assistant_message_from_content` step by step: strip spaces, drop an
    assistant header, note and drop a leading `<|python_tag|>`, read the stop reason from a trailing
    `<|eot_id|>`/`<|eom_id|>` (else keep `stop_reason`), then look for one tool call, in order:
    `<function=name>{...}`, a JSON object with "name" and "parameters", a Python list of keyword calls
    (first call only), `tool.call(query="...")`, and finally code after the python tag. A builtin tool
    named in a custom call gets `{"query": <first argument>}`. With a tool call, content is "".

    Differences from Meta, only on input where Meta's parser crashes or prints:
    - A custom call Meta cannot turn into a tool call (JSON with "name" but no "parameters", a
      non-str name, "parameters" that is not an object, a builtin tool with no arguments, Python-list
      arguments that are not literals, nesting too deep) is treated as no custom call: parsing goes
      on to the builtin pattern and the python tag, as Meta does after a bad `<function=...>` body.
    - A `<function=...>` body that is not JSON is skipped silently (Meta prints the exception).
    - Arguments nested deeper than Meta's pydantic `ToolCall` type allows are returned as parsed
      (Meta raises a ValidationError).
    Kept from Meta on purpose, since they decide what a well-formed reply means: nested objects in a
    `<function=...>` body do not parse (the pattern stops at the first "}"), single quotes become
    double quotes there, builtin queries cannot contain '"', and only the first of several calls in
    a Python list is returned.
    """
    if stop_reason not in STOP_REASONS:
        raise ValueError(f"stop_reason: expected one of {STOP_REASONS}, got {stop_reason!r}")
    content = text.strip(" ")
    content = content.removeprefix(_ASSISTANT_HEADER)
    ipython = content.startswith(_PYTHON_TAG)
    content = content.removeprefix(_PYTHON_TAG)
    for token, reason in _END_TOKENS:
        if content.endswith(token):
            content = content[: -len(token)]
            stop_reason = reason
            break
    call = _find_tool_call(content, ipython)
    return {
        "role": "assistant",
        "content": "" if call else content,
        "tool_calls": [{"function": {"name": call.name, "arguments": call.arguments}}] if call else [],
        "stop_reason": stop_reason,
    }


class _NoCall:
    """Marker: the body names a custom tool but has null parameters, which Meta reads as no call."""


def _find_tool_call(body: str, ipython: bool) -> _ToolCall | None:
    custom = _custom_tool_call(body)
    if isinstance(custom, _NoCall):
        return None
    if custom is not None:
        return custom
    builtin = _BUILTIN_CALL.search(body)
    if builtin:
        return _ToolCall(builtin["tool_name"], {"query": builtin["query"]})
    if ipython:
        return _ToolCall("code_interpreter", {"code": body})
    return None


def _custom_tool_call(body: str) -> _ToolCall | _NoCall | None:
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
    return _ToolCall(name, arguments)


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
# Tool-calling prompts (Llama 3.1, `llama3_1/prompt_format.md`)


@dataclass(frozen=True)
class _Param:
    name: str
    param_type: str
    description: str
    required: bool


@dataclass(frozen=True)
class _CustomTool:
    name: str
    description: str
    params: tuple[_Param, ...]


def system_prompt(
    *,
    builtin_tools: Sequence[str] = (),
    custom_tools: Sequence[Mapping[str, Any]] = (),
    today: datetime.date | None = None,
    instructions: str | None = None,
) -> str:
    """System message content announcing tools, the knowledge cutoff and today's date.

    Any tool turns on "Environment: ipython", which alone enables code_interpreter, so that tool is
    never listed on the "Tools:" line. `today` defaults to the local date, as in Meta's generator.
    """
    for i, tool in enumerate(builtin_tools):
        if tool not in BUILTIN_TOOLS:
            raise ValueError(f"builtin_tools[{i}]: expected one of {BUILTIN_TOOLS}, got {tool!r}")
    for i, tool in enumerate(custom_tools):
        _parse_custom_tool(tool, f"custom_tools[{i}]")
    today = datetime.date.today() if today is None else today
    text = ""
    if builtin_tools or custom_tools:
        text += "Environment: ipython\n"
        listed = [tool for tool in builtin_tools if tool != "code_interpreter"]
        if listed:
            # Meta's template swallows the newline after the Tools line; the "\n" below restores one.
            text = text + "Tools: " + ", ".join(listed)
        text += "\n"
    text += f"Cutting Knowledge Date: {_KNOWLEDGE_CUTOFF}\nToday Date: {_format_date(today)}"
    if instructions:
        text += "\n\n" + instructions
    return text + "\n"


def custom_tools_message(tools: Sequence[Mapping[str, Any]], *, tool_format: ToolFormat = "json") -> str:
    """User message content that defines custom tools, in Meta's JSON or `<function=...>` template.

    A tool is `{"name", "description", "parameters": {name: {"param_type", "description", "required"}}}`
    (`required` defaults to True, like Meta's `ToolParamDefinition`; "tool_name" is accepted for
    "name"). Names and descriptions are pasted into the template unescaped, exactly as Meta's Jinja
    template does. A missing description renders as "" where Meta would print "None".
    """
    parsed = [_parse_custom_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    if tool_format == "json":
        return _json_tools_prompt(parsed)
    if tool_format == "function_tag":
        return _function_tag_tools_prompt(parsed)
    raise ValueError(f"tool_format: expected 'json' or 'function_tag' for Llama 3.1 prompts, got {tool_format!r}")


def tool_prompt_messages(
    *,
    builtin_tools: Sequence[str] = (),
    custom_tools: Sequence[Mapping[str, Any]] = (),
    today: datetime.date | None = None,
    instructions: str | None = None,
    tool_format: ToolFormat = "json",
) -> list[dict[str, str]]:
    """The messages that open a tool-using dialog: the system prompt, then custom tools as a user turn."""
    messages = [
        {
            "role": "system",
            "content": system_prompt(
                builtin_tools=builtin_tools, custom_tools=custom_tools, today=today, instructions=instructions
            ),
        }
    ]
    if custom_tools:
        messages.append({"role": "user", "content": custom_tools_message(custom_tools, tool_format=tool_format)})
    return messages


def _format_date(day: datetime.date) -> str:
    return f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"


def _parse_custom_tool(tool: Mapping[str, Any], where: str) -> _CustomTool:
    if not isinstance(tool, Mapping):
        raise ValueError(f"{where}: expected a dict with 'name', 'description' and 'parameters'")
    name = tool.get("name", tool.get("tool_name"))
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: expected a non-empty str, got {name!r}")
    if name in BUILTIN_TOOLS:
        raise ValueError(f"{where}.name: {name!r} is a builtin tool; pass it in builtin_tools")
    description = _expect_str(tool.get("description") or "", f"{where}.description")
    parameters = tool.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where}.parameters: expected a dict of parameter name -> definition")
    return _CustomTool(
        name=name,
        description=description,
        params=tuple(_parse_param(pname, p, f"{where}.parameters.{pname}") for pname, p in parameters.items()),
    )


def _parse_param(name: str, param: Any, where: str) -> _Param:
    if not isinstance(param, Mapping) or not isinstance(param.get("param_type"), str):
        raise ValueError(f"{where}: expected a dict with a str 'param_type', got {param!r}")
    required = param.get("required", True)
    if not isinstance(required, bool):
        raise ValueError(f"{where}.required: expected bool, got {required!r}")
    description = _expect_str(param.get("description") or "", f"{where}.description")
    return _Param(name=name, param_type=param["param_type"], description=description, required=required)


def _jinja_tojson(value: Any) -> str:
    """Jinja's `tojson` filter: sorted keys, and HTML-sensitive characters as \\u escapes."""
    text = json.dumps(value, sort_keys=True)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escape)
    return text


def _json_tool_definition(tool: _CustomTool) -> str:
    # Written out by hand, like Meta's template, so the key order is fixed and not sorted.
    properties = ",".join(
        "\n                {\n"
        f'                    "{p.name}": {{\n'
        '                        "type": "object",\n'
        f'                        "description": "{p.description}"\n'
        "                    }\n"
        "                }"
        for p in tool.params
    )
    required = _jinja_tojson([p.name for p in tool.params if p.required])
    return (
        "{\n"
        '    "type": "function",\n'
        '    "function": {\n'
        f'        "name": "{tool.name}",\n'
        f'        "description": "{tool.description}",\n'
        '        "parameters": {\n'
        '            "type": "object",\n'
        f'            "properties": [{properties}\n'
        "            ],\n"
        f'            "required": {required}\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def _json_tools_prompt(tools: Sequence[_CustomTool]) -> str:
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
        + "".join(_json_tool_definition(tool) for tool in tools)
        + "\nReturn function calls in JSON format."
    )


def _function_tag_tool_definition(tool: _CustomTool) -> str:
    params = {
        p.name: {"description": p.description, "param_type": p.param_type, "required": p.required} for p in tool.params
    }
    return (
        f"Use the function '{tool.name}' to '{tool.description}':\n"
        f'{{"name": "{tool.name}", "description": "{tool.description}", "parameters": {_jinja_tojson(params)}}}\n\n'
    )


def _function_tag_tools_prompt(tools: Sequence[_CustomTool]) -> str:
    return (
        "You have access to the following functions:\n\n"
        + "".join(_function_tag_tool_definition(tool) for tool in tools)
        + "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )

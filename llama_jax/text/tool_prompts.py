"""Llama 3.1 tool-calling prompts (`llama3_1/prompt_format.md`): the system prompt that announces tools,
the user message that defines custom tools, and the messages that open a tool-using dialog.

Meta's llama-models `llama3/prompt_templates/system_prompts.py`, its Jinja templates written out so the
text is byte for byte Meta's. The tool calls themselves, and custom tool definitions, are
`llama_jax.text.tools`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_jax.text.tools import BUILTIN_TOOLS, CustomTool, ToolFormat, parse_custom_tool

__all__ = ["custom_tools_message", "system_prompt", "tool_prompt_messages"]

_KNOWLEDGE_CUTOFF = "December 2023"
# Meta formats with strftime("%d %B %Y"); a fixed table keeps the prompt independent of the locale.
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


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
        parse_custom_tool(tool, f"custom_tools[{i}]")
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
    parsed = [parse_custom_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
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


def _jinja_tojson(value: Any) -> str:
    """Jinja's `tojson` filter: sorted keys, and HTML-sensitive characters as \\u escapes."""
    text = json.dumps(value, sort_keys=True)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("'", "\\u0027")):
        text = text.replace(char, escape)
    return text


def _json_tool_definition(tool: CustomTool) -> str:
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


def _json_tools_prompt(tools: Sequence[CustomTool]) -> str:
    return (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
        + "".join(_json_tool_definition(tool) for tool in tools)
        + "\nReturn function calls in JSON format."
    )


def _function_tag_tool_definition(tool: CustomTool) -> str:
    params = {
        p.name: {"description": p.description, "param_type": p.param_type, "required": p.required} for p in tool.params
    }
    return (
        f"Use the function '{tool.name}' to '{tool.description}':\n"
        f'{{"name": "{tool.name}", "description": "{tool.description}", "parameters": {_jinja_tojson(params)}}}\n\n'
    )


def _function_tag_tools_prompt(tools: Sequence[CustomTool]) -> str:
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

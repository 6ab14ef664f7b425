"""Tool calls: what a chat request's `tools` and `tool_choice` ask of the output, and the calls
read back out of it.

    tool_choice "none"      the tools are rendered by the chat template; the output is text
    tool_choice "auto"      the output is text; calls the model wrote in its template's format
                            are parsed out of it (formats below), the rest stays content
    tool_choice "required"  the output is constrained (generation/grammar.py) to a JSON array of
                            one or more calls, [{"name": ..., "arguments": {...}}], each call's
                            arguments valid against its function's parameter schema (one call
                            when parallel_tool_calls is false)
    a named function        the output is constrained to that function's arguments object

Formats recognised under "auto": Hermes-style blocks, `<tool_call>{"name": ..., "arguments":
...}</tool_call>` (Hermes, Qwen2 and Qwen2.5 templates; recognised when the model's chat
template mentions `<tool_call>`), and a whole message that is one JSON call, `{"name": ...,
"arguments"|"parameters": {...}}` (Llama 3.1's JSON tool calling). Anything else stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from service.errors import InvalidInput, short

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_HERMES = re.compile(re.escape(HERMES_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(HERMES_CLOSE) + r"|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        doc = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return doc if index is None else {"index": index, **doc}


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools, as the output must treat them."""

    tools: list[dict]  # as the chat template receives them: {"type": "function", "function": {...}}
    choice: str  # "none", "auto", "required", or "function" (a named one)
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")

    def schema(self) -> dict:
        """The JSON schema a constrained output follows."""
        functions = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools}
        if self.choice == "function":
            return functions[self.name]
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for name, parameters in functions.items()
            ]
        }
        return {"type": "array", "items": call, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}

    def calls(self, text: str, style: str | None) -> tuple[str | None, list[ToolCall]]:
        """(the content left, the calls) read from an output."""
        if self.choice == "function":
            return None, [ToolCall(self.name, text)]
        if self.choice == "required":
            return None, [ToolCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in json.loads(text)]
        if self.choice == "auto":
            return parse_calls(text, style, {t["function"]["name"] for t in self.tools})
        return text, []


def plan(tools: list[dict] | None, tool_choice, parallel: bool | None) -> ToolPlan | None:
    """Check a chat request's tools and tool_choice (OpenAI's shapes); None without tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidInput("tool_choice: the request has no tools")
        return None
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidInput(f"tools[{i}]: {{'type': 'function', 'function': {{...}}}} (got {short(tool)})")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise InvalidInput(f"tools[{i}].function.name: 1-64 letters, digits, '_' or '-' (got {short(name)})")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidInput(f"tools[{i}].function.parameters: a JSON schema object")
        names.append(name)
    if len(set(names)) != len(names):
        raise InvalidInput("tools: two functions share a name")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise InvalidInput(f"tool_choice: names no function of the request's tools (got {short(choice)})")
        return ToolPlan(tools, "function", name, parallel is not False)
    if choice not in ("none", "auto", "required"):
        raise InvalidInput(f"tool_choice: 'none', 'auto', 'required' or a named function (got {short(choice)})")
    return ToolPlan(tools, choice, None, parallel is not False)


def template_style(source: str) -> str | None:
    """The tool-call format a chat template teaches its model, if one tserve parses."""
    return "hermes" if HERMES_OPEN in source else None


def parse_calls(text: str, style: str | None, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """Calls of known functions written in a recognised format; the text around them stays."""
    calls: list[ToolCall] = []
    if style == "hermes" and HERMES_OPEN in text:
        rest = []
        last = 0
        for m in _HERMES.finditer(text):
            call = _call(m.group(1), names)
            if call is None:
                continue
            rest.append(text[last : m.start()])
            last = m.end()
            calls.append(call)
        rest.append(text[last:])
        if calls:
            content = "".join(rest).strip()
            return content or None, calls
    stripped = text.strip()
    if stripped.startswith("{"):
        call = _call(stripped, names)
        if call is not None:
            return None, [call]
    return text, []


def _call(body: str, names: set[str]) -> ToolCall | None:
    try:
        doc = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("name") not in names:
        return None
    arguments = doc.get("arguments", doc.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        return ToolCall(doc["name"], arguments)
    return ToolCall(doc["name"], json.dumps(arguments, ensure_ascii=False))

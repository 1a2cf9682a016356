"""Tool calling on the chat endpoint, the way Qwen models call tools (Hermes style, as Qwen2.5's
chat template and vLLM's `hermes` parser do): the tools are rendered into the system turn
(templates/qwen2_vl_tools.jinja, since Qwen2-VL's own template has none — or the server's
`--chat-template`), the model answers with

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

blocks, and the server turns them into OpenAI `tool_calls`. `tool_choice: "required"` or a named
function is forced by a grammar (engine/grammar.py: the call's JSON follows the function's
`parameters` schema), so the call always parses; `auto` parses what the model wrote.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..engine.grammar import lark_grammar
from .structured import FieldProblem

TEMPLATE = Path(__file__).parent / "templates" / "qwen2_vl_tools.jinja"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolSpec:
    """A request's tools and how they may be used."""

    tools: List[Dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects, as sent
    choice: str = "auto"  # auto | none | required | named
    name: Optional[str] = None  # the function a named tool_choice forces
    parallel: bool = True  # several calls in one answer

    @property
    def names(self) -> List[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def parses(self) -> bool:
        """Whether the answer is read for tool calls."""
        return bool(self.tools) and self.choice != "none"

    def grammar(self) -> Optional[str]:
        """The grammar that forces a call (required, or a named function); None for auto / none."""
        if self.choice not in ("required", "named"):
            return None
        chosen = [t["function"] for t in self.tools if self.choice == "required" or t["function"]["name"] == self.name]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in chosen
        ]
        schema = dict(
            calls[0] if len(calls) == 1 else {"anyOf": calls}, **{"x-guidance": {"whitespace_flexible": False}}
        )
        many = ' ("\\n" call)*' if self.parallel else ""
        return lark_grammar(
            f'start: call{many}\ncall: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}\n'
        )


def parse_tools(body: Dict) -> Optional[ToolSpec]:
    """tools / tool_choice / parallel_tool_calls of a chat request, checked; None without tools."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise FieldProblem("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise FieldProblem("'tools' must be a list of {type: function, function: {name, parameters}}", "tools")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise FieldProblem(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}", f"tools[{i}]")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise FieldProblem(f"tools[{i}].function.parameters must be a JSON schema object", f"tools[{i}]")
    spec = ToolSpec(tools=list(tools), parallel=body.get("parallel_tool_calls", True) is not False)
    if choice is None or choice in ("auto", "none", "required"):
        spec.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance((choice.get("function") or {}).get("name"), str):
        spec.choice, spec.name = "named", choice["function"]["name"]
        if spec.name not in spec.names:
            raise FieldProblem(f"'tool_choice' names '{spec.name}', which is not in 'tools'", "tool_choice")
    else:
        raise FieldProblem(
            "'tool_choice' must be auto, none, required or {type: function, function: {name}}", "tool_choice"
        )
    return spec


def history_calls(calls: Any, where: str) -> List[Dict[str, Any]]:
    """An assistant message's tool_calls, for the template: arguments as objects (OpenAI sends
    them as JSON strings; the template writes them as JSON once)."""
    if not isinstance(calls, list):
        raise FieldProblem(f"{where}.tool_calls must be a list", where)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise FieldProblem(f"{where}.tool_calls[{j}] needs function.name", where)
        args = f.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise FieldProblem(f"{where}.tool_calls[{j}].function.arguments is not JSON", where) from None
        out.append({"type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def tool_calls_in(text: str) -> Tuple[Optional[str], List[Dict[str, Any]]]:
    """(content, OpenAI tool_calls) of an answer: every <tool_call> block whose JSON has a name and
    object arguments becomes a call; content is the text before the first block (None if blank).
    An answer without such a block is all content."""
    calls = []
    for m in _BLOCK.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments", {}), dict):
            calls.append(
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": obj["name"],
                        "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False),
                    },
                }
            )
    if not calls:
        return text, []
    content = text[: text.find(OPEN)].strip()
    return content or None, calls


def safe_content(text: str) -> str:
    """The part of a streamed answer that is surely content: before any <tool_call>, and not a
    tail that could begin one."""
    at = text.find(OPEN)
    if at >= 0:
        return text[:at]
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return text[:-k]
    return text

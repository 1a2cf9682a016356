"""Structured-output fields of a request -> one llguidance grammar (engine/grammar.py), checked:
OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (Lark). At most one per request; a schema or
grammar the library cannot compile is a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from ..engine.grammar import grammar_problem, json_schema_grammar, lark_grammar, regex_grammar

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class FieldProblem(ValueError):
    """A request field that cannot be used (structured output, tools): the protocol answers it
    with a 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _response_format(rf: Any) -> Optional[str]:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise FieldProblem("'response_format' must be an object with a 'type'", "response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise FieldProblem("'response_format.json_schema' needs a 'schema' object", "response_format")
        # strict or not, the schema is enforced while decoding: what strict mode promises
        return json_schema_grammar(spec["schema"])
    raise FieldProblem(f"'response_format.type' {kind!r}: use text, json_object or json_schema", "response_format")


def _guided(key: str, value: Any) -> str:
    if key == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise FieldProblem("'guided_json' must be a JSON schema (an object, or a string of one)", key) from None
        if not isinstance(value, dict):
            raise FieldProblem("'guided_json' must be a JSON schema (an object, or a string of one)", key)
        return json_schema_grammar(value)
    if key == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise FieldProblem("'guided_choice' must be a list of non-empty strings", key)
        return lark_grammar("start: " + " | ".join(json.dumps(c) for c in value))
    if not isinstance(value, str) or not value:
        raise FieldProblem(f"'{key}' must be a non-empty string", key)
    return regex_grammar(value) if key == "guided_regex" else lark_grammar(value)


def structured_output(body: Dict) -> Optional[str]:
    """The request's grammar, or None (free text)."""
    given = [k for k in ("response_format", *GUIDED) if body.get(k) is not None]
    if len(given) > 1:
        raise FieldProblem(f"one way to constrain the output per request, got {', '.join(given)}", given[1])
    if not given:
        return None
    key = given[0]
    grammar = _response_format(body[key]) if key == "response_format" else _guided(key, body[key])
    if grammar is None:
        return None
    problem = grammar_problem(grammar)
    if problem:
        raise FieldProblem(f"'{key}' cannot be compiled: {problem}", key)
    if body.get("ignore_eos"):
        raise FieldProblem(f"'{key}' with 'ignore_eos': a constrained answer ends when it is complete", "ignore_eos")
    if body.get("min_tokens"):
        raise FieldProblem(f"'{key}' with 'min_tokens': the answer may be complete sooner", "min_tokens")
    return grammar

"""Structured output in the engine (llguidance grammars, engine/grammar.py): random weights, which
left alone never write JSON, write JSON that parses and validates against the schema — greedy and
sampled, alone and in a batch beside free requests (whose tokens the masks must not touch), and
across a preemption; a regular expression is followed; a grammar the library cannot compile is
refused on arrival."""

from __future__ import annotations

import json
import re

import pytest
from test_engine import make_engine

from modeltest.engine.grammar import grammar_problem, json_schema_grammar, regex_grammar
from modeltest.engine.request import Request, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
PROMPTS = {"a": [9707, 11, 1879, 0], "b": [785, 6722, 315, 9625, 374], "c": [40, 1079, 264]}


@pytest.fixture(scope="module")
def engine(demo):
    return make_engine(demo.model, max_output_length=64)


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.model)


def request(name, grammar=None, max_new_tokens=64, **kw):
    params = SamplingParams(max_new_tokens=max_new_tokens, grammar=grammar, **kw)
    return Request(name, list(PROMPTS[name[0]]), params)


def answer(tokenizer, r) -> str:
    return tokenizer.decode(r.generated_ids())


def test_json_schema_outputs_parse_and_validate_greedy_and_sampled(engine, tokenizer):
    import jsonschema

    grammar = json_schema_grammar(SCHEMA)
    reqs = [request(n, grammar) for n in PROMPTS] + [
        request(f"{n}{seed}", grammar, temperature=1.0, seed=seed) for n in PROMPTS for seed in (1, 2)
    ]
    for r in engine.generate(reqs):
        text = answer(tokenizer, r)
        assert r.output_ids[-1] in r.params.stop_token_ids, (r.id, text)  # ended: the grammar was complete
        jsonschema.validate(json.loads(text), SCHEMA)
    free = engine.generate([request("a")])[0]
    with pytest.raises(ValueError):  # what the mask prevents: these weights alone write no JSON
        json.loads(answer(tokenizer, free))


def test_masks_stay_with_their_request_in_a_batch(engine, tokenizer):
    grammar = regex_grammar("(yes|no), because [a-z]{1,12}\\.")
    alone = {n: engine.generate([request(n)])[0].output_ids for n in PROMPTS}
    guided = engine.generate([request("a", grammar)])[0]
    mixed = engine.generate([request("a", grammar), request("b"), request("c")])
    assert mixed[0].output_ids == guided.output_ids
    assert re.fullmatch("(yes|no), because [a-z]{1,12}\\.", answer(tokenizer, mixed[0]))
    assert {r.id: r.output_ids for r in mixed[1:]} == {"b": alone["b"], "c": alone["c"]}


def test_a_preempted_guided_request_resumes_its_grammar(demo, tokenizer):
    import jsonschema

    grammar = json_schema_grammar(SCHEMA)
    roomy = make_engine(demo.model, max_output_length=64)
    want = [r.output_ids for r in roomy.generate([request(n, grammar, 40) for n in "ab"])]
    # three blocks: each answer alone fits, the two together do not
    tight = make_engine(demo.model, max_output_length=64, kv_cache_tokens=3 * 16, max_batch_size=2)
    got = tight.generate([request(n, grammar, 40) for n in "ab"])
    assert tight.stats().preemptions > 0
    assert [r.output_ids for r in got] == want
    for r in got:
        jsonschema.validate(json.loads(answer(tokenizer, r)), SCHEMA)


def test_a_grammar_the_library_cannot_compile_is_refused_on_arrival(engine):
    bad = json_schema_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})
    assert "nowhere" in grammar_problem(bad)
    r = engine.generate([request("a", bad)])[0]
    assert r.status.value == "failed" and r.error.startswith("grammar:") and "nowhere" in r.error
    r = engine.generate([request("a", json_schema_grammar(SCHEMA), ignore_eos=True)])[0]
    assert r.status.value == "failed" and "ignore_eos" in r.error

"""`POST /v1/completions` on a real server process with the tiny model (fp32), driven by the
official `openai` client as log-likelihood harnesses and benchmark tools drive it: prompt logprobs
against transformers, the legacy logprobs shape, several prompts with n choices, streamed equal to
not streamed, greedy text equal to the in-process engine, and every bad request a 400 naming it."""

from __future__ import annotations

import httpx
import pytest
import torch
from serve_helpers import ServerProcess

pytestmark = pytest.mark.subprocess

MODEL = "Qwen2-VL-tiny-random"
PROMPT = "The capital of France is Paris, and the capital of Italy is"


@pytest.fixture(scope="module")
def server(demo):
    # small blocks and passes: a long prompt is scored in several chunks
    s = ServerProcess(demo.model, "--block-size", "16", "--max-num-batched-tokens", "24", "--max_input_length", "1024")
    yield s
    rc, out, err = s.stop()
    assert rc == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_logsoftmax(demo):
    """ids -> transformers' log-softmax [len(ids), vocab] (fp32, the same weights)."""
    from transformers import Qwen2VLForConditionalGeneration

    from modeltest.backends.hf import dtype_kwarg

    hf = Qwen2VLForConditionalGeneration.from_pretrained(demo.model, **dtype_kwarg(torch.float32)).eval()

    def run(ids):
        x = torch.tensor([ids])
        with torch.no_grad():
            return torch.log_softmax(hf(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float(), dim=-1)

    return run


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.model)


def test_echo_logprobs_score_the_prompt_as_transformers_does(client, tokenizer, hf_logsoftmax):
    """A log-likelihood request (echo, logprobs, max_tokens 0): the prompt back as text and
    tokens, the first token's logprob null, every other token's logprob and top-3 equal to
    transformers' log-softmax (1e-4), in the legacy shape; by text or by token ids alike."""
    ids = tokenizer(PROMPT)["input_ids"]
    ref = hf_logsoftmax(ids)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and "".join(lp.tokens) == PROMPT
    assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4)
    for p in range(len(ids) - 1):
        best = torch.topk(ref[p], 3)
        top = lp.top_logprobs[p + 1]
        for tid, v in zip(best.indices.tolist(), best.values.tolist()):
            assert abs(top[tokenizer.decode([tid])] - v) < 1e-4
        assert lp.tokens[p + 1] in top and len(top) <= 4  # the prompt token always, as OpenAI
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    assert by_ids.choices[0].text == PROMPT
    assert by_ids.choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_the_lm_eval_loglikelihood_request(client, tokenizer, hf_logsoftmax):
    """What lm-evaluation-harness sends per (context, continuation): echo, logprobs 1,
    max_tokens 1, greedy: the prompt's logprobs, then one generated token with its logprob —
    the greedy one, the top of its top_logprobs."""
    ids = tokenizer(PROMPT)["input_ids"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and r.usage.completion_tokens == 1
    last = hf_logsoftmax(ids)[-1]
    assert lp.tokens[-1] == tokenizer.decode([int(last.argmax())])
    assert abs(lp.token_logprobs[-1] - float(last.max())) < 1e-4
    assert max(lp.top_logprobs[-1].values()) == lp.token_logprobs[-1]
    assert r.choices[0].text == PROMPT + lp.tokens[-1]


def test_greedy_text_equals_the_in_process_engine(client, demo, tokenizer):
    from modeltest.engine.engine import EngineConfig, LLMEngine
    from modeltest.engine.parallel import TPContext
    from modeltest.engine.request import Request, SamplingParams

    engine = LLMEngine(
        EngineConfig(model_path=str(demo.model), dtype=torch.float32, max_input_length=256, max_output_length=16),
        TPContext(),
    )
    ids = tokenizer(PROMPT)["input_ids"]
    ours = engine.generate([Request("x", ids, SamplingParams(max_new_tokens=12))])[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == tokenizer.decode(ours.generated_ids())
    assert r.usage.completion_tokens == len(ours.output_ids)
    default = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_prompts_times_choices_streamed_or_not(client):
    """Two prompts × n=2 with a seed: choice index = prompt × n + choice; the stream's pieces per
    index add up to the body's text and logprobs; the prompt counted once per prompt in usage."""
    ask = dict(
        model=MODEL,
        prompt=["Once upon a time", "Hello world"],
        max_tokens=5,
        n=2,
        seed=7,
        temperature=1.0,
        echo=True,
        logprobs=2,
    )
    body = client.completions.create(**ask)
    assert [c.index for c in body.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith("Once upon a time") for c in body.choices[:2])
    assert all(c.text.startswith("Hello world") for c in body.choices[2:])
    assert len({c.text for c in body.choices[:2]}) == 2  # each choice draws its own tokens
    assert body.usage.prompt_tokens == 4 + 2
    text, tokens, lps, reasons = {}, {}, {}, {}
    usage = None
    for chunk in client.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + c.logprobs.tokens
            lps[c.index] = lps.get(c.index, []) + c.logprobs.token_logprobs
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    for c in body.choices:
        assert text[c.index] == c.text and tokens[c.index] == c.logprobs.tokens
        assert lps[c.index] == c.logprobs.token_logprobs and reasons[c.index] == c.finish_reason
    assert usage.prompt_tokens == body.usage.prompt_tokens
    assert usage.completion_tokens == body.usage.completion_tokens


@pytest.mark.parametrize(
    "change, param",
    [
        ({"max_tokens": 0}, "max_tokens"),  # scoring only: with echo
        ({"suffix": " end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": "word " * 1100}, "prompt"),  # over --max_input_length 1024
        ({"echo": "yes"}, "echo"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, change, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", **change}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_token_id_outside_the_vocabulary_is_a_400_and_the_server_goes_on(server, client):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 10**7], "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason


# ---- structured output -------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "colours"],
    "additionalProperties": False,
}
ASK = dict(model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=64)


def test_json_schema_answers_validate_streamed_or_not(client):
    """Random weights write JSON that validates against the schema (the `jsonschema` package),
    greedy and sampled; the stream's text is the body's."""
    import json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5, "n": 3}):
        r = client.chat.completions.create(**ASK, **sampling, response_format=fmt)
        for c in r.choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ASK, temperature=0, response_format=fmt, stream=True)
        if c.choices
    )
    greedy = client.chat.completions.create(**ASK, temperature=0, response_format=fmt)
    assert streamed == greedy.choices[0].message.content
    free = client.chat.completions.create(**ASK, temperature=0)
    with pytest.raises(ValueError):  # what the grammar changes: these weights alone write no JSON
        json.loads(free.choices[0].message.content)


def test_json_object_and_the_guided_extensions(client, tokenizer):
    """json_object: an object that parses (a logit bias towards quotes, colons and braces makes
    random weights close it soon; without the mask the same bias writes no JSON); guided_choice
    picks one of the choices; guided_regex is matched; completions take them too."""
    import json
    import re

    bias = {str(tokenizer.convert_tokens_to_ids(t)): 40 for t in ('"', ":", "}", "1")}
    obj = client.chat.completions.create(**ASK, temperature=0, logit_bias=bias, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    free = client.chat.completions.create(**ASK, temperature=0, logit_bias=bias)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    choice = client.chat.completions.create(**ASK, temperature=0, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    pattern = "[0-9]{3}-[a-z]{2,4}"
    rx = client.completions.create(model=MODEL, prompt="Code:", max_tokens=16, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, rx.choices[0].text)


@pytest.mark.parametrize(
    "change, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ],
)
def test_structured_output_that_cannot_run_is_a_400_naming_the_field(server, change, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- tools -------------------------------------------------------------------------------------
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"enum": ["UTC", "CET"]}},
                "required": ["tz"],
                "additionalProperties": False,  # (else random weights add keys until max_tokens)
            },
        },
    },
]
WEATHER_ASK = dict(
    model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=64, temperature=0
)


def test_a_forced_tool_call_always_parses_and_validates_streamed_or_not(client):
    import json

    import jsonschema

    for choice, names in (("required", {"get_weather", "get_time"}), (FORCE_TIME, {"get_time"})):
        r = client.chat.completions.create(**WEATHER_ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
        streamed, reasons = [], []
        for chunk in client.chat.completions.create(
            **WEATHER_ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, stream=True
        ):
            for ch in chunk.choices:
                streamed += ch.delta.tool_calls or []
                reasons.append(ch.finish_reason)
        assert [(t.function.name, t.function.arguments) for t in streamed] == [
            (call.function.name, call.function.arguments)
        ]
        assert [x for x in reasons if x] == ["tool_calls"]


FORCE_TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tool_history_is_accepted_and_auto_answers_as_text(client):
    """An assistant turn of tool calls (content null) and the tool's answer are rendered and run;
    with tool_choice auto, random weights write no <tool_call>: the answer is content."""
    history = [
        *WEATHER_ASK["messages"],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"},
    ]
    r = client.chat.completions.create(**{**WEATHER_ASK, "messages": history}, tools=TOOLS)
    c = r.choices[0]
    assert c.message.tool_calls is None and c.message.content and c.finish_reason in ("stop", "length")
    without = client.chat.completions.create(**WEATHER_ASK)
    assert r.usage.prompt_tokens > without.usage.prompt_tokens + 100  # the tools and the turns are in the prompt


@pytest.mark.parametrize(
    "change, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_tool_requests_that_cannot_run_are_a_400_naming_the_field(server, change, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "tools": TOOLS}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"

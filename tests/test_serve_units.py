"""The server's parts without HTTP or a model: the detokenizer, the request parser and its sampling
parameters, the media resolver, and the engine's scheduler. (tests/test_serve.py holds them to the
same answers through a real server.)"""

import base64
import json

import pytest

from modeltest.engine.request import RequestStatus, SamplingParams, visible_ids
from modeltest.serve.chat_protocol import MediaPart, parse_chat_request
from modeltest.serve.detokenize import Detokenizer
from modeltest.serve.media_urls import MediaResolver
from modeltest.serve.protocol import RequestError, SamplingDefaults

IM_END, EOT = 151645, 151643


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.model)


# ---- the detokenizer ----------------------------------------------------------------------------
def stream(det: Detokenizer, ids):
    out = "".join(det.add([i]) for i in ids)
    return out + det.finish()


def test_streamed_deltas_add_up_to_one_full_decode(tokenizer):
    text = "Hello, 你好世界! The answer is 42 — ünïcödé 🙂."
    ids = tokenizer.encode(text)
    det = Detokenizer(tokenizer, [], (IM_END, EOT), ignore_eos=False)
    deltas = [det.add([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)  # half a character is held back, never sent
    assert "".join(deltas) + det.finish() == tokenizer.decode(ids) == text
    assert det.finish_reason(RequestStatus.FINISHED, max_tokens=len(ids)) == "length"


def test_the_stop_token_is_left_out_and_ends_with_stop(tokenizer):
    ids = tokenizer.encode("short answer") + [IM_END]
    det = Detokenizer(tokenizer, [], (IM_END, EOT), ignore_eos=False)
    assert stream(det, ids) == "short answer"
    assert det.finish_reason(RequestStatus.FINISHED, max_tokens=len(ids)) == "stop"
    # with ignore_eos the stop token is an ordinary token: kept, and the reason is the length
    det = Detokenizer(tokenizer, [], (IM_END, EOT), ignore_eos=True)
    assert stream(det, ids) == tokenizer.decode(ids)
    assert det.finish_reason(RequestStatus.FINISHED, max_tokens=len(ids)) == "length"
    # the same rule as the engine's
    assert visible_ids(ids, (IM_END, EOT), False) == ids[:-1] and visible_ids(ids, (IM_END, EOT), True) == ids


def test_stop_strings_cut_the_text_and_nothing_after_them_is_sent(tokenizer):
    ids = tokenizer.encode("one two THREE four five")
    det = Detokenizer(tokenizer, ["THREE"], (IM_END,), ignore_eos=False)
    sent = ""
    for i in ids:
        sent += det.add([i])
        assert "THR" not in sent  # a possible start of a stop string is held back
    sent += det.finish()
    assert sent == "one two " and det.stopped_by_string
    assert det.finish_reason(RequestStatus.ABORTED, max_tokens=100) == "stop"
    det = Detokenizer(tokenizer, [], (IM_END,), ignore_eos=False)
    det.add(ids[:2])
    assert det.finish_reason(RequestStatus.ABORTED, max_tokens=100) == "abort"


# ---- the request parser ---------------------------------------------------------------------------
def body(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


def test_a_request_parses_into_its_parts():
    req = parse_chat_request(
        {
            "model": "m",
            "max_tokens": 7,
            "temperature": 0,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "mm_processor_kwargs": {"fps": 1.0},
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                        {"type": "text", "text": "what?"},
                    ],
                },
            ],
        }
    )
    assert req.model == "m" and req.max_tokens == 7 and req.stop == ["END"] and req.stream and req.include_usage
    assert [m.role for m in req.messages] == ["system", "user"]
    assert [p.kind for p in req.media] == ["image"] and req.messages[1].parts[1] == "what?"
    assert req.mm_processor_kwargs == {"fps": 1.0}


@pytest.mark.parametrize(
    "bad,param",
    [
        ({"messages": []}, None),
        (body(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (body(max_tokens=-1), "max_tokens"),
        (body(temperature="hot"), "temperature"),
        (body(mm_processor_kwargs={"fsp": 1}), "mm_processor_kwargs"),
        (body(mm_processor_kwargs={"fps": -1}), "mm_processor_kwargs"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(bad, param):
    with pytest.raises(RequestError) as e:
        parse_chat_request(bad)
    assert e.value.status == 400
    if param:
        assert (e.value.param or "").startswith(param), (e.value.param, e.value.message)


def test_sampling_parameters_take_the_servers_defaults_and_limits():
    defaults = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20)
    s = parse_chat_request(body()).sampling(defaults, max_output_length=64)
    assert (s["max_new_tokens"], s["temperature"], s["top_p"], s["top_k"]) == (64, 0.7, 0.8, 20)
    assert isinstance(s["seed"], int)  # sampled: a seed is drawn
    g = parse_chat_request(body(temperature=0, max_tokens=5, top_k=-1)).sampling(defaults, 64)
    assert (g["temperature"], g["max_new_tokens"], g["top_k"], g["seed"]) == (0, 5, 0, None)
    assert SamplingParams(**g).greedy
    with pytest.raises(RequestError, match="over this server's max_output_length 64"):
        parse_chat_request(body(max_tokens=65)).sampling(defaults, 64)


def test_sampling_defaults_come_from_the_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.01, "top_p": 0.001, "top_k": 1}))
    assert SamplingDefaults.from_model(str(tmp_path)) == SamplingDefaults(0.01, 0.001, 1)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert SamplingDefaults.from_model(str(tmp_path)).temperature == 0.0
    assert SamplingDefaults.from_model(str(tmp_path / "none")) == SamplingDefaults()


# ---- the media resolver ---------------------------------------------------------------------------
def part(url, kind="image"):
    return MediaPart(kind=kind, url=url, param="messages[0].content[0]")


def test_data_urls_become_files_and_local_files_stay_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(b"png-bytes")
    (tmp_path / "secret.png").write_bytes(b"secret")
    work = tmp_path / "work"
    work.mkdir()
    r = MediaResolver(str(allowed), allow_remote=False, remote_timeout_s=1, max_remote_bytes=10)
    path = r.resolve(part("data:image/png;base64," + base64.b64encode(b"\x89PNG data").decode()), work)
    assert open(path, "rb").read() == b"\x89PNG data" and path.endswith(".png") and path.startswith(str(work))
    assert r.resolve(part(f"file://{allowed / 'a.png'}"), work) == str(allowed / "a.png")
    for escape in (f"file://{allowed}/../secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(RequestError, match="outside --allowed-local-media-path"):
            r.resolve(part(escape), work)
    with pytest.raises(RequestError, match="remote media is off"):
        r.resolve(part("http://example.com/a.png"), work)
    with pytest.raises(RequestError, match="list of frames"):
        r.resolve(part("data:video/jpeg;base64,AAAA,BBBB", "video"), work)
    with pytest.raises(RequestError, match="image/png data URL in a video part"):
        r.resolve(part("data:image/png;base64,AAAA", "video"), work)
    closed = MediaResolver(None, allow_remote=False, remote_timeout_s=1, max_remote_bytes=10)
    with pytest.raises(RequestError, match="local files are not served"):
        closed.resolve(part(f"file://{allowed / 'a.png'}"), work)


def test_tool_calls_are_read_from_hermes_blocks():
    from modeltest.serve.tools import safe_content, tool_calls_in

    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><tool_call>\n{"name": "cut'
    content, calls = tool_calls_in(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]  # the unfinished third block is not a call
    assert tool_calls_in("no calls <tool_call>{bad json}</tool_call>") == (
        "no calls <tool_call>{bad json}</tool_call>",
        [],
    )
    # streamed: text that may begin a call waits
    assert safe_content("Sure <tool") == "Sure " and safe_content("a < b") == "a < b"
    assert safe_content('x <tool_call>\n{"na') == "x "


def test_the_tool_template_renders_as_qwen25_and_leaves_other_requests_to_the_checkpoint(demo):
    """With tools: Qwen2.5's system section, calls and <tool_response> turns, character for
    character; without: exactly the checkpoint's own template."""
    from transformers import AutoProcessor

    from modeltest.inputs import prompt_text
    from modeltest.serve.tools import TEMPLATE

    proc = AutoProcessor.from_pretrained(demo.model)
    template = TEMPLATE.read_text()
    user = {"role": "user", "content": [{"type": "image", "image": "x.jpg"}, {"type": "text", "text": "Weather?"}]}
    for messages in (
        [user],
        [{"role": "system", "content": "Be brief."}, user, {"role": "assistant", "content": "Hm."}],
    ):
        assert prompt_text(proc, messages, chat_template=template) == prompt_text(proc, messages)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        user,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "22 C"},
        {"role": "tool", "content": "sunny"},
    ]
    want = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Weather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt_text(proc, messages, chat_template=template, tools=[tool]) == want


def test_a_chat_template_file_is_checked_at_start(demo, tmp_path):
    import argparse

    from modeltest.errors import UserError
    from modeltest.serve.config import add_serve_parser, serve_config_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="cmd"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    for path, why in ((tmp_path / "missing.jinja", "is not a file"), (bad, "is not a Jinja template")):
        args = parser.parse_args(["serve", "--model_path", str(demo.model), "--chat-template", str(path)])
        with pytest.raises(UserError, match=why):
            serve_config_from_args(args)


def test_an_unknown_message_field_is_named_once_in_the_log(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="modeltest.serve"):
        for _ in range(2):
            parse_chat_request({"messages": [{"role": "user", "content": "x", "name": "bob", "mood": "happy"}]})
    named = [r.getMessage() for r in caplog.records if "messages[].mood" in r.getMessage()]
    assert len(named) == 1 and not any("name" in r.getMessage() for r in caplog.records)

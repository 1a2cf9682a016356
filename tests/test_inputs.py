"""The one conversation -> model-input path (modeltest/inputs.py): what it hands the model equals the
reference path (qwen-vl-utils' process_vision_info + transformers' processor) bit for bit, the
server's request -> conversation gives the harness's model input for the same question, and the
media content keys tell media apart by content."""

import copy

import pytest
import torch
from qwen_vl_utils import process_vision_info

from modeltest.core import Sample
from modeltest.inputs import ModelInput, engine_request, model_input, prompt_text, sample_messages
from modeltest.media import InProcessMedia
from modeltest.media.cache import MediaCache
from modeltest.media.processor import load_processor


@pytest.fixture(scope="module")
def processors(demo):
    reference = load_processor(str(demo.model))
    fast = load_processor(str(demo.model), fast=True)
    return reference, fast


def image_sample(demo, i=0, prompt="what does the sign say?"):
    return Sample(
        id=f"i{i}",
        subject="t",
        prompt=prompt,
        images=[str(demo.root / "textvqa" / "images" / f"demo_00{i}.jpg")],
        image_options={"min_pixels": 3136, "max_pixels": 200704},
    )


def video_sample(demo, prompt="what happens?", fps=0.5):
    return Sample(
        id="v",
        subject="t",
        prompt=prompt,
        videos=[str(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4")],
        video_options={"fps": fps, "max_pixels": 150528},
    )


def reference_inputs(processor, sample: Sample) -> dict:
    """The reference path, written out independently of modeltest: one user turn with images,
    then videos, then the text; qwen-vl-utils; the chat template; the processor."""
    content = [{"type": "image", "image": p, **sample.image_options} for p in sample.images]
    content += [{"type": "video", "video": p, **sample.video_options} for p in sample.videos]
    content.append({"type": "text", "text": sample.prompt})
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages)
    return dict(processor(text=[text], images=images, videos=videos, return_tensors="pt"))


def assert_same_inputs(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["image", "video", "text"])
@pytest.mark.parametrize("fast", [False, True], ids=["reference-processor", "fast-processor"])
def test_model_input_is_the_reference_path_bit_for_bit(demo, processors, tmp_path, kind, fast):
    reference, fast_proc = processors
    sample = {
        "image": image_sample(demo),
        "video": video_sample(demo),
        "text": Sample(id="t", subject="t", prompt="Hello there"),
    }[kind]
    expected = reference_inputs(reference, sample)
    proc = fast_proc if fast else reference
    got = model_input(proc, sample_messages(sample))
    assert_same_inputs(got.inputs, expected)
    assert got.prompt_tokens == expected["input_ids"].shape[1]
    # through the media cache, cold then warm: the same values again
    cache = InProcessMedia(MediaCache(tmp_path / "cache", 1 << 30))
    for _ in range(2):
        assert_same_inputs(model_input(proc, sample_messages(sample), cache).inputs, expected)


def test_without_the_chat_template_the_prompt_is_placeholders_then_text(demo, processors):
    reference, _ = processors
    s = Sample(id="x", subject="t", prompt="Q?", images=["a.jpg", "b.jpg"], videos=["c.mp4"])
    text = prompt_text(reference, sample_messages(s), use_chat_template=False)
    assert text == (
        "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "<|vision_start|><|video_pad|><|vision_end|>" + "Q?"
    )


def test_media_keys_follow_content_not_placeholders(demo, processors, tmp_path):
    _, fast = processors
    q1 = model_input(fast, sample_messages(video_sample(demo, "first question?")))
    q2 = model_input(fast, sample_messages(video_sample(demo, "a second, longer question about it?")))
    other_fps = model_input(fast, sample_messages(video_sample(demo, "first question?", fps=1.0)))
    assert len(q1.media_keys()) == 1 and q1.media_keys() == q2.media_keys()
    assert other_fps.media_keys() != q1.media_keys()
    # Two different images of the same size: identical placeholder ids, different keys.
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"same_size_{i}.png"))
        Image.fromarray(rng.integers(0, 256, (224, 280, 3), dtype=np.uint8)).save(paths[-1])
    opts = image_sample(demo).image_options
    a = model_input(
        fast, sample_messages(Sample(id="a", subject="t", prompt="q", images=paths[:1], image_options=opts))
    )
    b = model_input(
        fast, sample_messages(Sample(id="b", subject="t", prompt="q", images=paths[1:], image_options=opts))
    )
    assert a.inputs["image_grid_thw"].tolist() == b.inputs["image_grid_thw"].tolist()
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    assert a.media_keys() != b.media_keys()
    # one key per medium, in prompt order
    two = Sample(id="2", subject="t", prompt="compare", images=paths, image_options=opts)
    assert model_input(fast, sample_messages(two)).media_keys() == a.media_keys() + b.media_keys()
    assert model_input(fast, sample_messages(Sample(id="t", subject="t", prompt="hi"))).media_keys() == []


def test_engine_request_carries_the_model_input(demo, processors):
    from modeltest.engine.request import SamplingParams

    _, fast = processors
    mi = model_input(fast, sample_messages(image_sample(demo)))
    req = engine_request("r", mi, SamplingParams(max_new_tokens=3))
    assert req.input_ids == mi.inputs["input_ids"][0].tolist() and req.params.max_new_tokens == 3
    assert req.pixel_values is mi.inputs["pixel_values"] and req.image_grid_thw is mi.inputs["image_grid_thw"]
    assert req.pixel_values_videos is None and req.video_grid_thw is None
    assert isinstance(ModelInput(text="", inputs=dict(mi.inputs)).media_keys(), list)


def test_a_served_request_gets_the_harness_model_input(demo, tmp_path):
    """The server's request -> conversation (media resolved to files, the task configs' options)
    then the one path: the same tensors as the harness's sample of the same question."""
    from modeltest.serve.chat_protocol import parse_chat_request
    from modeltest.serve.config import ServeConfig
    from modeltest.serve.preprocess import Preprocessor

    pre = Preprocessor(
        ServeConfig(model_path=str(demo.model), allowed_local_media_path=str(demo.root), media_cache="off")
    )
    try:
        for sample, kwargs in (
            (image_sample(demo), {"max_pixels": 200704}),
            (video_sample(demo), {"fps": 0.5, "max_pixels": 150528}),
        ):
            s = copy.deepcopy(sample)
            kind = "image" if s.images else "video"
            path = (s.images or s.videos)[0]
            body = {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": f"{kind}_url", f"{kind}_url": {"url": f"file://{path}"}},
                            {"type": "text", "text": s.prompt},
                        ],
                    }
                ],
                "mm_processor_kwargs": kwargs,
            }
            served = pre(parse_chat_request(body))
            # the server's defaults are the tasks' options; the request's kwargs override them
            opts = dict(pre.cfg.image_options if kind == "image" else pre.cfg.video_options, **kwargs)
            if kind == "image":
                s.image_options = opts
            else:
                s.video_options = opts
            harness = model_input(pre.processor, sample_messages(s))
            assert served.text == harness.text
            assert_same_inputs(served.inputs, harness.inputs)
    finally:
        pre.close()

"""Qwen2.5-VL: the engine, the harness and the server against transformers'
Qwen2_5_VLForConditionalGeneration on tiny random Qwen2.5-VL checkpoints (fp32, CPU).

The family needs transformers >= 4.49: these tests run in the transformers-5 pass of
scripts/test.sh. With an older transformers (the main pass, 4.46) the refusals below run instead
and the rest is skipped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import (
    all_inputs,
    assert_bf16_engine_close_to_transformers,
    assert_engine_equals_transformers,
    make_request,
    prompt_logits,
)
from test_engine import (
    BF16_DIVERGING_PROMPTS,
    BF16_LOGIT_TOLERANCE,
    _torchrun,
    make_engine,
    reference_model,
    transformers_reference,
)

from modeltest.engine.families import transformers_version
from modeltest.errors import UserError

HAS_QWEN2_5_VL = transformers_version() >= (4, 49)
needs_qwen2_5_vl = pytest.mark.skipif(not HAS_QWEN2_5_VL, reason="Qwen2.5-VL needs transformers >= 4.49")
TESTS = Path(__file__).resolve().parent


def build(root: Path, odd: bool) -> Path:
    from modeltest.demo.tiny_model import ODD_HEADS, TinyShape, build_tiny_qwen2vl

    # odd: 6 query heads over 2 KV heads (padded at world size 4), vision heads split 4 ways, an
    # MLP of 50 rows (split 12/13/12/13 at 4), an untied head, 1 time position per second.
    shape = dataclasses.replace(ODD_HEADS, vision_intermediate_size=50, tokens_per_second=1) if odd else TinyShape()
    return build_tiny_qwen2vl(root / "Qwen2.5-VL-tiny-random", shape, seed=1 if odd else 0, model_type="qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen25(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen25"), odd=False)


@pytest.fixture(scope="session")
def qwen25_odd(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen25odd"), odd=True)


@pytest.fixture(scope="session")
def small_image(tmp_path_factory):
    """A 40 x 40 image: resized to 56 x 56, 4 x 4 patches, 2 x 2 merged cells — smaller than one
    attention window (4 x 4 cells)."""
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    path = tmp_path_factory.mktemp("small") / "small.png"
    pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels, "RGB").save(path)
    return path


def cases(processor, demo, small_image) -> dict:
    from engine_helpers import processor_inputs

    inputs = all_inputs(processor, demo.root)
    content = [{"type": "image", "image": str(small_image)}, {"type": "text", "text": "what is it?"}]
    inputs["small_image"] = processor_inputs(processor, content)
    return inputs


@needs_qwen2_5_vl
@pytest.mark.parametrize("which", ["demo", "odd"])
def test_engine_matches_transformers_logits_and_greedy_tokens(which, qwen25, qwen25_odd, demo, small_image):
    """Text, one image (a grid that is not whole windows), two images of different sizes, an image
    smaller than a window, and a video whose sampled fps puts its frame groups 8 (demo) or 4
    (odd) positions apart (not further: transformers 5 then places the text after the video
    differently from the original, see rope_index): every prompt logit and every decode step's logits within 1e-4 of
    transformers', the same greedy tokens, by the recording and by the production sampler."""
    from transformers import AutoProcessor

    path = qwen25 if which == "demo" else qwen25_odd
    inputs = cases(AutoProcessor.from_pretrained(path), demo, small_image)
    grids = {n: inp["image_grid_thw"].tolist() for n, inp in inputs.items() if "image_grid_thw" in inp}
    assert grids["image"] == [[1, 14, 20]] and grids["small_image"] == [[1, 4, 4]]  # 7 x 10 and 2 x 2 cells
    assert inputs["video"]["second_per_grid_ts"].tolist() == [4.0]  # 2 / 0.5 fps
    assert_engine_equals_transformers(reference_model(path), lambda: make_engine(path), inputs)


@needs_qwen2_5_vl
@pytest.mark.parametrize("which", ["demo", "odd"])
def test_bf16_engine_matches_transformers_in_bf16(which, qwen25, qwen25_odd, demo, small_image):
    """What real checkpoints run, as for Qwen2-VL (test_engine.py): both in bf16 on the same
    inputs, prefill logits within BF16_LOGIT_TOLERANCE, greedy tokens identical but for at most
    BF16_DIVERGING_PROMPTS prompts whose near-tied random logits bf16 rounding flips (measured
    2026-12-01, AVX2 CPU, transformers 5.24 and 4.57.1: at most 0.047; one prompt of five on each
    model — demo "text", odd "small_image")."""
    from transformers import AutoProcessor

    path = qwen25 if which == "demo" else qwen25_odd
    inputs = cases(AutoProcessor.from_pretrained(path), demo, small_image)
    engine = make_engine(path, dtype=torch.bfloat16)
    hf = reference_model(path, torch.bfloat16)
    assert_bf16_engine_close_to_transformers(hf, engine, inputs, BF16_LOGIT_TOLERANCE, BF16_DIVERGING_PROMPTS)


@needs_qwen2_5_vl
def test_the_video_time_step_moves_the_answer(qwen25, demo):
    """The engine does use second_per_grid_ts: the video prompt at 1 s per step instead of 4 s
    gives other logits (so the parity above is not blind to the time positions)."""
    from transformers import AutoProcessor

    inp = all_inputs(AutoProcessor.from_pretrained(qwen25), demo.root)["video"]
    engine = make_engine(qwen25)
    at_4s = prompt_logits(engine, make_request("a", inp, 1))
    at_1s = prompt_logits(engine, make_request("b", {**inp, "second_per_grid_ts": torch.tensor([1.0])}, 1))
    assert (at_4s - at_1s).abs().max().item() > 1e-2


@needs_qwen2_5_vl
@pytest.mark.subprocess  # torchrun worlds of 1, 2 and 4 gloo processes
def test_tensor_parallel_2_and_4_match_transformers(qwen25_odd, demo, tmp_path):
    hf = transformers_reference(qwen25_odd, demo.root, new_tokens=6)
    base = _torchrun(1, qwen25_odd, demo.root, tmp_path / "w1.pt")
    for n in (2, 4):
        res = _torchrun(n, qwen25_odd, demo.root, tmp_path / f"w{n}.pt")
        assert res["world_size"] == n
        assert res["alone"] == hf["tokens"], n
        for name, logits in hf["last_logits"].items():
            assert (res["logits"][name] - logits).abs().max().item() < 1e-4, (n, name)
        assert res["batch"] == base["batch"] and res["reuse"] == base["reuse"], n
    assert res["layout"] == [[0], [0, 1]]  # rank 0 at world 4: KV head 0 shared with rank 1, a padded query head


@needs_qwen2_5_vl
def test_second_per_grid_ts_is_qwen_vl_utils_sampled_fps_whatever_the_transformers(qwen25, demo):
    """Temporal patch size / the fps qwen-vl-utils sampled at: what transformers 4.49-4.57 compute
    from video_kwargs and transformers 5 from video metadata — and not transformers 5's silent
    24 fps for frames handed over without metadata (pinned: if it changes, this says so)."""
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    from modeltest.inputs import model_input, prompt_text

    processor = AutoProcessor.from_pretrained(qwen25)
    clip = demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"
    for fps in (0.5, 1.0, 2.0):
        messages = [
            {
                "role": "user",
                "content": [{"type": "video", "video": str(clip), "fps": fps}, {"type": "text", "text": "?"}],
            }
        ]
        ours = model_input(processor, messages).inputs["second_per_grid_ts"]
        _, videos, video_kwargs = process_vision_info(messages, return_video_kwargs=True)
        assert ours.dtype == torch.float32
        assert ours.tolist() == torch.tensor([2 / f for f in video_kwargs["fps"]]).tolist(), fps
        text = prompt_text(processor, messages)
        if transformers_version() < (5, 0):  # 4.49-4.57: the fps qwen-vl-utils reports
            by_kwargs = processor(text=[text], videos=videos, return_tensors="pt", **video_kwargs)
            assert torch.as_tensor(by_kwargs["second_per_grid_ts"]).float().tolist() == ours.tolist(), fps
        else:
            _, with_meta = process_vision_info(messages, return_video_metadata=True)
            frames, metadata = zip(*with_meta)
            by_metadata = processor(
                text=[text], videos=list(frames), video_metadata=list(metadata), return_tensors="pt"
            )
            assert torch.as_tensor(by_metadata["second_per_grid_ts"]).float().tolist() == ours.tolist(), fps
            bare = processor(text=[text], videos=videos, return_tensors="pt")
            assert torch.as_tensor(bare["second_per_grid_ts"]).tolist() == pytest.approx([2 / 24]), fps


@needs_qwen2_5_vl
def test_the_fast_processor_and_the_media_cache_are_bit_identical_on_qwen2_5_vl(qwen25, demo, tmp_path):
    """Qwen2.5-VL's processor keeps Qwen2-VL's image processor: the fast one installs on it and
    hands the model the same tensors (torch.equal), time steps included, through the cache too."""
    import copy

    from test_fast_processor import IMG, VID, assert_same
    from transformers import AutoProcessor

    from modeltest.inputs import model_input
    from modeltest.media import InProcessMedia, fast_processor
    from modeltest.media.cache import MediaCache
    from modeltest.media.decode import vision_from_messages

    # The slow image processor, the one ours replaces (transformers 4.57 loads its own fast one by
    # default; from 5 ours steps aside: transformers' own is then the reference).
    reference = AutoProcessor.from_pretrained(qwen25, use_fast=False)
    fast = fast_processor.install(copy.deepcopy(reference))
    assert fast_processor.installed(fast) == (transformers_version() < (5, 0))
    clip = demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"
    image = demo.root / "textvqa" / "images" / "demo_003.jpg"
    content = [
        {"type": "image", "image": str(image)},
        {"type": "video", "video": str(clip), "fps": 0.5},
        {"type": "text", "text": "q"},
    ]
    messages = [{"role": "user", "content": content}]
    images, videos = vision_from_messages(messages)
    if fast_processor.installed(fast):
        assert_same(reference, fast, IMG + VID + " q", images=images, videos=videos)
    want = model_input(reference, messages).inputs
    cache = InProcessMedia(MediaCache(str(tmp_path / "cache"), 1 << 30))
    runs = [model_input(fast, messages, media).inputs for media in (None, cache, cache)]  # uncached, miss, hit
    assert cache.summary()["hits"] >= 2
    for got in runs:
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k])), k


def test_rope_index_numbers_video_frames_by_time():
    """By hand: 3 frame groups of 2 x 2 merged cells at 1.5 s per group and 2 positions per second
    sit at times 0, 3, 6 after the 2 text tokens before them; the text after resumes at the
    largest position + 1 (6 + 2 + 1 = 9), as the original implementation places it."""
    from modeltest.engine.rope import rope_index, temporal_index

    ids = [1, 2] + [7] * 12 + [3, 4]
    pos, delta = rope_index(ids, [], [(3, 4, 4)], 6, 7, 2, second_per_grid_ts=[1.5], tokens_per_second=2)
    t, h, w = pos[:, 2:14].view(3, 3, 4)
    assert t[:, 0].tolist() == [2, 5, 8] and h[0].tolist() == [2, 2, 3, 3] and w[0].tolist() == [2, 3, 2, 3]
    assert pos[:, 14:].tolist() == [[9, 10]] * 3 and delta == 11 - len(ids)
    # float32 and truncated, in the original's order: 0.7 s x 2 = 1.4 -> 0, 1, 2, 4
    assert temporal_index(4, 0.7, 2).tolist() == [0, 1, 2, 4]
    # Qwen2-VL (no tokens_per_second): one position per group, whatever the fps
    plain, _ = rope_index(ids, [], [(3, 4, 4)], 6, 7, 2, second_per_grid_ts=[1.5])
    assert plain[0, 2:14:4].tolist() == [2, 3, 4]


@needs_qwen2_5_vl
def test_model_inputs_equal_qwen2_vl_golden_inputs(qwen25, demo):
    """Qwen2.5-VL keeps Qwen2-VL's chat template, tokenizer and processor: on the golden samples
    its prompts, token ids, grids and pixels are those of tests/golden/model_inputs.json; its
    videos add the time step (2 / the sampled fps)."""
    from test_prompt_golden import GOLDEN, current

    from modeltest.config.schema import ModelConfig
    from modeltest.inputs import model_input, sample_messages
    from modeltest.media.processor import load_processor
    from modeltest.tasks.videobench import VideoBenchTask, VideoBenchTaskConfig

    golden = json.loads(GOLDEN.read_text())
    got = current(SimpleNamespace(model=qwen25, textvqa_jsonl=demo.textvqa_jsonl, videobench_qa=demo.videobench_qa))
    for task in ("textvqa", "videobench"):
        for ours, want in zip(got[task], golden[task]):
            assert {k: v for k, v in ours.items() if k != "pixel_stats"} == {
                k: v for k, v in want.items() if k != "pixel_stats"
            }
            for k, stats in want["pixel_stats"].items():
                assert ours["pixel_stats"][k] == pytest.approx(stats, abs=1e-3)
    processor = load_processor(str(qwen25))
    task = VideoBenchTask(VideoBenchTaskConfig(local_dataset_path=str(demo.videobench_qa)), ModelConfig())
    samples = [s for s in task.load_samples() if s.load_error is None][:2]
    seconds = [model_input(processor, sample_messages(s)).inputs["second_per_grid_ts"].tolist() for s in samples]
    assert seconds == [[4.0], [4.0]]


def run_qwen25(task: str, backend: str, model: Path, demo, out: Path):
    from conftest import run_mm

    from modeltest.demo.build import demo_overrides

    overrides = [*demo_overrides(demo, task)[1:], f"model.model_path={model}", f"model.backend={backend}"]
    return run_mm(task, [*overrides, f"output_dir={out}", "max_output_length=8"], model="qwen2_5_vl")


@needs_qwen2_5_vl
@pytest.mark.subprocess
@pytest.mark.parametrize("task", ["textvqa", "videobench"])
def test_harness_engine_answers_equal_transformers(task, qwen25, demo, tmp_path):
    """bash scripts/mm_run.sh TASK qwen2_5_vl: the engine's per-sample answers are transformers'."""
    from conftest import read_debug

    answers = {}
    for backend in ("engine", "hf"):
        run_qwen25(task, backend, qwen25, demo, tmp_path / backend)
        answers[backend] = {r["id"]: r["output"] for r in read_debug(tmp_path / backend, task)}
    assert answers["engine"] == answers["hf"] and len(answers["engine"]) >= 4


@needs_qwen2_5_vl
@pytest.mark.subprocess
def test_server_answers_equal_the_in_process_engine(qwen25, demo):
    from openai import OpenAI
    from serve_helpers import ServerProcess, data_url, in_process_answer
    from transformers import AutoProcessor

    from modeltest.serve.config import default_image_options, default_video_options

    image = demo.root / "textvqa" / "images" / "demo_000.jpg"
    clip = demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"
    q = {"type": "text", "text": "What is shown here?"}
    cases = {
        "image": (
            [{"type": "image_url", "image_url": {"url": data_url(image, "image/jpeg")}}, q],
            [{"type": "image", "image": str(image), **default_image_options()}, q],
        ),
        "video": (
            [{"type": "video_url", "video_url": {"url": data_url(clip, "video/mp4")}}, q],
            [{"type": "video", "video": str(clip), **default_video_options()}, q],
        ),
    }
    engine = make_engine(qwen25, max_input_length=4096, max_output_length=64)
    processor = AutoProcessor.from_pretrained(qwen25)
    server = ServerProcess(qwen25, "--max_batch_size", "2", "--max_input_length", "4096")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        for case, (parts, elements) in cases.items():
            want, prompt_tokens, _ = in_process_answer(engine, processor, elements, 8)
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
            )
            assert r.choices[0].message.content == want, case
            assert r.usage.prompt_tokens == prompt_tokens, case
    finally:
        rc, _, err = server.stop()
    assert rc == 0 and "Traceback" not in err, err


# ---- refusals: these run with any transformers ---------------------------------------------------


QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}


def test_a_qwen2_5_vl_config_reads_as_published(monkeypatch, tmp_path):
    """The published 7B config.json: the tower's width is hidden_size, the merger's output
    out_hidden_size; windows, full-attention blocks and time positions as written."""
    import modeltest.engine.families as families
    from modeltest.engine.config import Qwen2VLConfig

    monkeypatch.setattr(families, "transformers_version", lambda: (4, 49))
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_5_VL_7B))
    mc = Qwen2VLConfig.from_path(tmp_path)
    v = mc.vision
    assert (v.embed_dim, v.hidden_size, v.mlp_dim, v.num_heads, v.head_dim) == (1280, 3584, 3420, 16, 80)
    assert v.windowed and v.window_size == 112 and v.fullatt_block_indexes == (7, 15, 23, 31)
    assert v.tokens_per_second == 2 and mc.family.name == "Qwen2.5-VL"
    for tp in (1, 2, 4, 8):
        mc.check_tensor_parallel(tp, "7B")  # 28 / 4 heads: padded query heads at 8, as today
    with pytest.raises(UserError, match="tensor parallel size 3"):
        mc.check_tensor_parallel(3, "7B")


def ours_and_transformers(path: Path):
    """What our reader and transformers' AutoConfig read from one config.json, side by side."""
    from transformers import AutoConfig

    from modeltest.engine.config import Qwen2VLConfig

    ours, theirs = Qwen2VLConfig.from_path(path), AutoConfig.from_pretrained(path)
    text, vision = theirs.get_text_config(), theirs.vision_config
    rope = getattr(text, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta there
    lm = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    got = [getattr(ours, k) for k in (*lm, "vocab_size", "rms_norm_eps", "tie_word_embeddings", "rope_theta")]
    want = [getattr(text, k) for k in (*lm, "vocab_size", "rms_norm_eps")]
    want += [theirs.tie_word_embeddings, rope.get("rope_theta", getattr(text, "rope_theta", None))]
    v = ours.vision
    got += [v.depth, v.num_heads, v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels]
    want += [getattr(vision, k) for k in ("depth", "num_heads", "patch_size", "temporal_patch_size")]
    want += [vision.spatial_merge_size, vision.in_channels]
    if v.windowed:  # Qwen2.5-VL: the tower's width is hidden_size, the merger's out_hidden_size
        got += [v.embed_dim, v.hidden_size, v.mlp_dim, v.window_size, list(v.fullatt_block_indexes)]
        got += [v.tokens_per_second]
        want += [vision.hidden_size, vision.out_hidden_size, vision.intermediate_size, vision.window_size]
        want += [list(vision.fullatt_block_indexes), vision.tokens_per_second]
    else:
        got += [v.embed_dim, v.hidden_size, v.mlp_dim]
        want += [vision.embed_dim, vision.hidden_size, int(vision.embed_dim * vision.mlp_ratio)]
    return got, want


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_a_config_json_without_keys_reads_as_transformers_reads_it(model_type, tmp_path):
    """transformers' save_pretrained writes only the values that differ from its defaults (a
    Qwen2.5-VL saved by transformers 4.49 has no window_size: 112 is the default), and reads a
    missing key as that default: every key left out reads as transformers reads it — an empty
    config (all defaults) and the published 7B config saved through transformers."""
    if model_type == "qwen2_5_vl" and not HAS_QWEN2_5_VL:
        pytest.skip("Qwen2.5-VL needs transformers >= 4.49")
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": {}}))
    got, want = ours_and_transformers(tmp_path)
    assert got == want
    published = {**QWEN2_5_VL_7B, "model_type": model_type}
    if model_type == "qwen2_vl":  # Qwen2-VL-7B's tower: embed_dim 1280, the merger out 3584
        published["vision_config"] = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16}
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "config.json").write_text(json.dumps(published))
    AutoConfig.from_pretrained(tmp_path / "published").save_pretrained(tmp_path / "saved")
    got, want = ours_and_transformers(tmp_path / "saved")
    assert got == want and got[:5] == [3584, 18944, 28, 28, 4]


@pytest.mark.parametrize(
    "model_type, where, act",
    [("qwen2_5_vl", "vision_config", "gelu"), ("qwen2_vl", "vision_config", "silu"), ("qwen2_vl", None, "gelu")],
)
def test_an_activation_the_engine_does_not_implement_is_refused_by_name(model_type, where, act, tmp_path, monkeypatch):
    """The engine implements each family's activations only (quick GELU / SiLU in the towers, SiLU
    in the language model): another in config.json is refused naming the key, never run as ours."""
    import modeltest.engine.families as families
    from modeltest.engine.config import Qwen2VLConfig

    monkeypatch.setattr(families, "transformers_version", lambda: (4, 49))

    config = json.loads(json.dumps({**QWEN2_5_VL_7B, "model_type": model_type}))
    (config[where] if where else config)["hidden_act"] = act
    (tmp_path / "config.json").write_text(json.dumps(config))
    key = f"{where}.hidden_act" if where else "hidden_act"
    with pytest.raises(UserError, match=rf"config.json: {key} is '{act}'; .* use backend=hf"):
        Qwen2VLConfig.from_path(tmp_path)


def test_an_old_transformers_refuses_qwen2_5_vl_in_one_line(monkeypatch, tmp_path):
    import modeltest.engine.families as families
    from modeltest.engine.config import read_checkpoint_config

    monkeypatch.setattr(families, "transformers_version", lambda: (4, 46))
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_5_VL_7B))
    with pytest.raises(UserError) as e:
        read_checkpoint_config(tmp_path)
    assert "Qwen2.5-VL needs transformers >= 4.49" in str(e.value) and "\n" not in str(e.value)
    # Qwen2-VL keeps working on that transformers
    (tmp_path / "q2").mkdir()
    (tmp_path / "q2" / "config.json").write_text(json.dumps({**QWEN2_5_VL_7B, "model_type": "qwen2_vl"}))
    assert read_checkpoint_config(tmp_path / "q2")["model_type"] == "qwen2_vl"


def test_a_checkpoint_of_the_other_family_is_refused_by_the_model_config(demo, tmp_path, monkeypatch):
    """mm_run.sh TASK qwen2_5_vl with a Qwen2-VL checkpoint (and the other way round): one line
    naming both families and the config to use, before anything loads."""
    import modeltest.engine.families as families
    from modeltest.config.loader import load_config
    from modeltest.tasks import TASKS

    monkeypatch.setattr(families, "transformers_version", lambda: (4, 49))
    qwen25 = tmp_path / "q25"
    qwen25.mkdir()
    (qwen25 / "config.json").write_text(json.dumps(QWEN2_5_VL_7B))
    for chosen, path, found, use in (
        ("qwen2_5_vl", demo.model, "Qwen2-VL", "qwen2_vl"),
        ("qwen2_vl", qwen25, "Qwen2.5-VL", "qwen2_5_vl"),
    ):
        overrides = [f"model.model_path={path}", f"task.local_dataset_path={demo.textvqa_jsonl}"]
        with pytest.raises(UserError) as e:
            load_config(TASKS, "textvqa", chosen, overrides)
        message = str(e.value)
        assert f"a {found} checkpoint" in message and f"run it with the model config '{use}'" in message, message
        assert "\n" not in message


@needs_qwen2_5_vl
@pytest.mark.subprocess
def test_run_pa_engine_answers_equal_transformers(qwen25, demo, tmp_path):
    """scripts/run_pa.sh on a folder of an image and a video: the engine's tokens = transformers'."""
    import shutil

    from test_run_pa import run_pa

    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(demo.root / "textvqa" / "images" / "demo_000.jpg", folder / "a.jpg")
    shutil.copy(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4", folder / "b.mp4")
    common = ["--model_path", str(qwen25), "--dataset_path", str(folder), "--input_text", "What is it?"]
    common += ["--max_batch_size", "2", "--max_output_length", "6"]
    tokens = {}
    for backend in ("engine", "hf"):
        res = tmp_path / f"{backend}.json"
        run_pa([*common, "--backend", backend, "--results_save_path", str(res)])
        tokens[backend] = [r["output_token_ids"] for r in json.loads(res.read_text())]
    assert tokens["engine"] == tokens["hf"] and len(tokens["engine"]) == 2 and all(tokens["engine"])

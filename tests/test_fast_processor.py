"""fast_processor's image processor hands the model exactly what transformers' processor does:
torch.equal on pixel values, grids and token ids, for images and videos of every shape here, and
the reference is used wherever the fast path would not be exact."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from modeltest.media import fast_processor
from modeltest.media.processor import load_processor


@pytest.fixture(scope="module")
def processors(demo):
    reference = load_processor(str(demo.model))
    fast = fast_processor.install(copy.deepcopy(reference))
    assert fast_processor.installed(fast) and not fast_processor.installed(reference)
    return reference, fast


def assert_same(reference, fast, text, images=None, videos=None, fast_expected=True):
    before = fast_processor.counts(fast)
    ref = reference(
        text=[text],
        images=images,
        videos=[v.float() if v.dtype == torch.uint8 else v for v in videos] if videos else None,
        return_tensors="pt",
    )
    got = fast(text=[text], images=images, videos=videos, return_tensors="pt")
    assert sorted(ref.keys()) == sorted(got.keys())
    for k in ref:
        if isinstance(ref[k], list):  # transformers 4.49-4.5x's Qwen2.5-VL second_per_grid_ts
            assert ref[k] == got[k], k
            continue
        assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
    fast_calls, ref_calls = (a - b for a, b in zip(fast_processor.counts(fast), before))
    assert (fast_calls > 0 and ref_calls == 0) if fast_expected else (ref_calls > 0), (fast_calls, ref_calls)


IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.mark.parametrize("size", [(56, 56), (84, 140), (1036, 756), (28 * 9, 28 * 31)])
def test_images_are_bit_identical(processors, size):
    rng = np.random.default_rng(size[0] * 7 + size[1])
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    assert_same(*processors, "look: " + IMG + " what?", images=[Image.fromarray(arr, "RGB")])


def test_several_images_in_one_call(processors):
    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
        for h, w in ((56, 84), (112, 56), (56, 56))
    ]
    assert_same(*processors, IMG * 3 + " compare", images=images)


@pytest.mark.parametrize("frames,h,w", [(2, 56, 56), (4, 84, 112), (6, 252, 448)])
def test_videos_are_bit_identical_as_float_and_as_uint8(processors, frames, h, w):
    rng = np.random.default_rng(frames)
    u8 = torch.from_numpy(rng.integers(0, 256, size=(frames, 3, h, w), dtype=np.uint8))
    assert_same(*processors, VID + " what happens?", videos=[u8.float()])  # qwen-vl-utils' form
    assert_same(*processors, VID + " what happens?", videos=[u8])  # media/decode.py's exact form


def test_two_videos_and_the_demo_media(processors, demo):
    from modeltest.media.decode import vision_from_messages

    video = {
        "type": "video",
        "video": str(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"),
        "fps": 0.5,
        "min_frames": 4,
        "max_frames": 768,
        "min_pixels": 100352,
        "max_pixels": 602112,
    }
    image = {"type": "image", "image": str(demo.root / "textvqa" / "images" / "demo_003.jpg")}
    images, videos = vision_from_messages([{"role": "user", "content": [image, video, dict(video, fps=1.0)]}])
    assert_same(*processors, IMG + VID + VID + " q", images=images, videos=videos)
    _, exact = vision_from_messages([{"role": "user", "content": [video]}], uint8=True)
    assert exact[0].dtype == torch.uint8 and torch.equal(exact[0].float(), videos[0])


def test_the_reference_runs_where_the_fast_path_would_not_be_exact(processors):
    reference, fast = processors
    rng = np.random.default_rng(2)
    # A size the processor resizes (not a multiple of 28): its own resize must run.
    odd = Image.fromarray(rng.integers(0, 256, size=(61, 95, 3), dtype=np.uint8), "RGB")
    assert_same(reference, fast, IMG, images=[odd], fast_expected=False)
    # Not RGB.
    gray = Image.fromarray(rng.integers(0, 256, size=(56, 56), dtype=np.uint8), "L")
    assert_same(reference, fast, IMG, images=[gray], fast_expected=False)
    # Frames that are not integers 0..255 (another qwen-vl-utils, say, handing over 0..1 floats).
    frac = torch.from_numpy(rng.random((2, 3, 56, 56), dtype=np.float32))
    assert_same(reference, fast, VID, videos=[frac], fast_expected=False)
    # An odd number of frames (the reference's own error, not ours).
    with pytest.raises(Exception):  # noqa: B017 — whatever the reference raises, the fast one raises too
        reference(text=[VID], videos=[torch.zeros(3, 3, 56, 56)], return_tensors="pt")
    with pytest.raises(Exception):  # noqa: B017 — whatever the reference raises, the fast one raises too
        fast(text=[VID], videos=[torch.zeros(3, 3, 56, 56)], return_tensors="pt")


def test_patchify_matches_the_processor_layout():
    frames = np.arange(2 * 3 * 56 * 84).reshape(2, 3, 56, 84)
    patches, grid = fast_processor.patchify(frames, 2, 14, 2)
    assert grid == (1, 4, 6) and patches.shape == (24, 3 * 2 * 14 * 14)
    # The first patch is the top-left 14x14 of both frames, channel-major then time then rows.
    first = patches[0].reshape(3, 2, 14, 14)
    assert np.array_equal(first[1, 0], frames[0, 1, :14, :14]) and np.array_equal(first[2, 1], frames[1, 2, :14, :14])
    # The second patch is to its right (within the 2x2 merge window), the third below.
    assert np.array_equal(patches[1].reshape(3, 2, 14, 14)[0, 0], frames[0, 0, :14, 14:28])
    assert np.array_equal(patches[2].reshape(3, 2, 14, 14)[0, 0], frames[0, 0, 14:28, :14])


def test_the_next_question_on_a_cached_clip_reuses_its_patches_and_nothing_else_is_reused(processors, demo, tmp_path):
    from modeltest.media.cache import MediaCache

    reference, fast = processors
    video = {
        "type": "video",
        "video": str(demo.root / "videobench" / "Eval_video" / "MSVD" / "msvd_red.mp4"),
        "fps": 0.5,
        "min_frames": 4,
        "max_frames": 768,
        "min_pixels": 100352,
        "max_pixels": 602112,
    }
    cache = MediaCache(tmp_path, 1 << 30)
    cache.video(dict(video))  # the entry exists
    first, second = cache.video(dict(video), uint8=True), cache.video(dict(video), uint8=True)
    assert first is second and fast_processor.is_immutable(first)  # one immutable tensor per entry
    ip = fast.image_processor
    a = fast(text=[VID], videos=[first], return_tensors="pt")
    hits_before = len(ip._memo)
    b = fast(text=[VID + " again"], videos=[second], return_tensors="pt")
    assert len(ip._memo) == hits_before and torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])
    assert_same(reference, fast, VID + " again", videos=[second])
    # A writable tensor with the same values is never recognised by identity: changed in place,
    # its new values are what the model gets.
    mine = first.clone()
    assert not fast_processor.is_immutable(mine)
    assert_same(reference, fast, VID, videos=[mine])
    mine[0, 0, 0, 0] = 255 - int(mine[0, 0, 0, 0])
    assert_same(reference, fast, VID, videos=[mine])

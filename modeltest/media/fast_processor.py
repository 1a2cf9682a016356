"""The Qwen2-VL image processor's work done cheaply, with bit-identical results.

transformers' Qwen2VLImageProcessor (4.x) spends a 60 s clip's second on: converting each frame
to numpy and through PIL for a resize that changes nothing (qwen-vl-utils already resized it),
rescale and normalize in float64/float32 passes, and a 9-axis transpose copy (patchify). For
qwen-vl-utils' output every step but the last is a function of one uint8 value and its channel:

  * the frames are integer-valued 0..255 (uint8 images, uint8-resized video frames);
  * their sizes are already multiples of patch_size * merge_size inside the processor's pixel
    bounds, so its resize keeps the size (PIL returns the image unchanged);
  * rescale and normalize are elementwise.

So `pixel = LUT[channel][value]`, a 256-entry float32 table per channel and per input kind, which
is *built by running the reference processor itself* on inputs holding every value (never by
re-deriving its arithmetic), followed by the same patchify as a single torch permute copy.

Anything outside those conditions (other kwargs, a non-integer frame, a size the processor would
change, another transformers major version) is handed to the reference processor unchanged.
tests/test_fast_processor.py compares both paths with torch.equal on images and videos of
every shape the tests use; docs/PERFORMANCE.md has the speed.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ACCEPTED_KWARGS = {"return_tensors"}
MEMO_VIDEOS = 2  # processed videos kept: the next questions on a clip reuse its patches

# uint8 frame tensors whose memory never changes (the media cache's read-only entries): only
# these may be recognised by identity and their patches reused.
# (A WeakSet would compare tensors with ==; this keys by identity.)
_IMMUTABLE: Dict[int, "weakref.ref[torch.Tensor]"] = {}
_IMMUTABLE_LOCK = threading.Lock()


def mark_immutable(frames: torch.Tensor) -> torch.Tensor:
    """Declare that `frames`' values never change (read-only memory that nothing writes to)."""
    key = id(frames)

    def forget(_ref, key=key):
        with _IMMUTABLE_LOCK:
            if _IMMUTABLE.get(key) is _ref:
                del _IMMUTABLE[key]

    with _IMMUTABLE_LOCK:
        _IMMUTABLE[key] = weakref.ref(frames, forget)
    return frames


def is_immutable(frames: torch.Tensor) -> bool:
    with _IMMUTABLE_LOCK:
        ref = _IMMUTABLE.get(id(frames))
    return ref is not None and ref() is frames


def _major_version() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def patchify(frames: np.ndarray, temporal: int, patch: int, merge: int) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """frames [T, C, H, W] -> (patches [gt*gh*gw, C*temporal*patch*patch], (gt, gh, gw)) in the
    processor's layout (the same reshape/transpose); a lone frame is repeated `temporal` times,
    as np.tile does there."""
    if frames.shape[0] == 1:
        frames = np.broadcast_to(frames, (temporal,) + frames.shape[1:])
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


class ExactFastImageProcessor:
    """Stands in for a Qwen2VLImageProcessor inside a processor: `__call__(images=, videos=,
    **kwargs)` returns the same BatchFeature, computed by table lookup + one permute where that
    is exact, by the reference processor otherwise.

    Videos may also arrive as uint8 tensors [T, 3, H, W] (media/decode.py hands over qwen-vl-utils'
    frames so when they are exact, saving a float copy and the integer check); the reference
    gets them back as float, exactly what qwen-vl-utils returned."""

    def __init__(self, reference):
        self.reference = reference
        self._luts: Dict[str, torch.Tensor] = {}  # "image" | "video" -> [C, 256] float32
        self._lock = threading.Lock()
        # id(frames) -> (frames, patches, grid) for immutable frames; holding `frames` keeps the
        # id from being reused by another tensor while the entry lives.
        self._memo: "collections.OrderedDict[int, Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int]]]" = (
            collections.OrderedDict()
        )
        self.fast_calls = self.reference_calls = 0
        ip = reference
        self.enabled = (
            _major_version() == 4 and type(ip).__name__ == "Qwen2VLImageProcessor" and ip.temporal_patch_size >= 1
        )

    def __getattr__(self, name):
        # merge_size, patch_size, ... as the processor reads them from its image processor
        return getattr(self.reference, name)

    def __deepcopy__(self, memo):
        import copy

        other = ExactFastImageProcessor(copy.deepcopy(self.reference, memo))
        other._luts = dict(self._luts)
        other._memo = self._memo  # copies (one per preprocessing thread) share the reuse
        other._lock = self._lock
        return other

    # ---- public ---------------------------------------------------------------------------------
    def __call__(self, images=None, videos=None, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        out = None
        if isinstance(videos, torch.Tensor):
            videos = [videos]
        if self.enabled and set(kwargs) <= ACCEPTED_KWARGS and (images is None) != (videos is None):
            if images is not None:
                out = self._images(images)
            else:
                out = self._videos(videos)
        if out is None:
            self.reference_calls += 1
            if videos is not None:  # uint8 frames (media/decode.py's exact form) as qwen-vl-utils returns them
                videos = [v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8 else v for v in videos]
            return self.reference(images=images, videos=videos, **kwargs)
        self.fast_calls += 1
        if kwargs.get("return_tensors") != "pt":
            out = {k: v.numpy() for k, v in out.items()}
        return BatchFeature(data=out, tensor_type=kwargs.get("return_tensors"))

    # ---- the two kinds ------------------------------------------------------------------------
    def _images(self, images) -> Optional[Dict[str, Any]]:
        from PIL import Image

        frames = []
        for im in images if isinstance(images, (list, tuple)) else [images]:
            if not isinstance(im, Image.Image) or im.mode != "RGB":
                return None
            arr = np.asarray(im)  # [H, W, 3] uint8
            if not self._size_kept(arr.shape[0], arr.shape[1]):
                return None
            frames.append(arr.transpose(2, 0, 1)[None])  # [1, 3, H, W] (a view)
        return self._patches(frames, "image", "pixel_values", "image_grid_thw", [None] * len(frames))

    def _videos(self, videos) -> Optional[Dict[str, Any]]:
        clips, known = [], []
        for v in videos:
            if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[1] != 3:
                return None
            if v.shape[0] % self.reference.temporal_patch_size or not self._size_kept(v.shape[2], v.shape[3]):
                return None
            known.append(v if v.dtype == torch.uint8 and is_immutable(v) else None)
            if v.dtype != torch.uint8:  # qwen-vl-utils' float frames: integers 0..255 only
                u8 = v.to(torch.uint8)
                if not v.is_floating_point() or not torch.equal(u8.to(v.dtype), v):
                    return None
                v = u8
            clips.append(v)  # [T, 3, H, W] uint8
        return self._patches(clips, "video", "pixel_values_videos", "video_grid_thw", known)

    def _patches(
        self, items: list, kind: str, values_key: str, grid_key: str, known: List[Optional[torch.Tensor]]
    ) -> Dict[str, Any]:
        """items: uint8 frames [T, 3, H, W] (numpy or torch); known[i]: items[i] if it is an
        immutable tensor whose patches may be reused, else None."""
        lut = self._lut(kind).numpy()  # [3, 256]
        ip = self.reference
        pieces, grids = [], []
        for item, frames in zip(items, known):
            if frames is not None:
                with self._lock:
                    hit = self._memo.get(id(frames))
                    if hit is not None and hit[0] is frames:
                        self._memo.move_to_end(id(frames))
                        pieces.append(hit[1].numpy())
                        grids.append(hit[2])
                        continue
            src = item.numpy() if isinstance(item, torch.Tensor) else item  # [T, 3, H, W] uint8
            # Patchify the uint8 values (a quarter of the bytes), then look each one up in its
            # channel's table straight into the output: channel c owns columns c*k .. (c+1)*k-1.
            u8, grid = patchify(src, ip.temporal_patch_size, ip.patch_size, ip.merge_size)  # [N, 3*k]
            n = u8.shape[0]
            patches = np.empty(u8.shape, dtype=lut.dtype).reshape(n, 3, -1)  # [N, 3, k] float32
            u8 = u8.reshape(n, 3, -1)
            for c in range(3):  # numpy indexes with the uint8 values directly (no int64 copy)
                patches[:, c] = lut[c][u8[:, c]]
            pieces.append(patches.reshape(n, -1))
            grids.append(grid)
            if frames is not None:
                with self._lock:
                    self._memo[id(frames)] = (frames, torch.from_numpy(pieces[-1]), grid)
                    while len(self._memo) > MEMO_VIDEOS:
                        self._memo.popitem(last=False)
        # One piece: handed over as it is (several requests may share it; nothing writes to model inputs).
        values = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        # torch tensors already: BatchFeature would copy numpy arrays into new tensors.
        return {values_key: torch.from_numpy(values), grid_key: torch.tensor(grids)}

    # ---- conditions and tables ------------------------------------------------------------------
    def _size_kept(self, h: int, w: int) -> bool:
        """The reference's resize is a no-op: smart_resize maps (h, w) to itself."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        ip = self.reference
        try:
            return smart_resize(
                h, w, factor=ip.patch_size * ip.merge_size, min_pixels=ip.min_pixels, max_pixels=ip.max_pixels
            ) == (h, w)
        except ValueError:
            return False

    def _lut(self, kind: str) -> torch.Tensor:
        """[3, 256] float32: what the reference makes of value v in channel c for this input kind,
        read back from its own output on a frame holding every value in every channel."""
        with self._lock:
            if kind in self._luts:
                return self._luts[kind]
        ip = self.reference
        side = ip.patch_size * ip.merge_size  # a square the reference keeps: >= 256 and >= min_pixels
        h = w = side * int(np.ceil(np.sqrt(max(256, ip.min_pixels)) / side))
        if not self._size_kept(h, w):
            raise ValueError(f"no size the image processor keeps near {h}x{w}")
        values = (np.arange(h * w) % 256).astype(np.uint8).reshape(h, w)
        rgb = np.stack([values, np.roll(values, 85), np.roll(values, 170)], axis=-1)  # [H, W, 3]
        if kind == "image":
            from PIL import Image

            out = ip(images=[Image.fromarray(rgb, "RGB")], videos=None, return_tensors="pt")["pixel_values"]
        else:
            frames = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).repeat(ip.temporal_patch_size, 1, 1, 1)
            out = ip(images=None, videos=[frames.float()], return_tensors="pt")["pixel_values_videos"]
        # Undo the patchify: where did each (t, c, y, x) go? Patchify the positions themselves.
        t = ip.temporal_patch_size
        positions = np.arange(t * 3 * h * w).reshape(t, 3, h, w)
        where, _ = patchify(positions, t, ip.patch_size, ip.merge_size)
        frames_back = torch.empty(t * 3 * h * w, dtype=out.dtype)
        frames_back[torch.from_numpy(where.reshape(-1))] = out.reshape(-1)
        frames_back = frames_back.reshape(t, 3, h, w)[0]  # [3, H, W]
        lut = torch.empty(3, 256, dtype=out.dtype)
        src = torch.from_numpy(rgb).permute(2, 0, 1).long()  # [3, H, W]
        for c in range(3):
            lut[c, src[c].reshape(-1)] = frames_back[c].reshape(-1)
        with self._lock:
            self._luts[kind] = lut
        return lut


def install(processor) -> Any:
    """Give `processor` (a transformers Qwen2-VL processor) the exact fast image processor;
    returns it. A processor of another kind is returned unchanged."""
    ip = getattr(processor, "image_processor", None)
    if ip is not None and not isinstance(ip, ExactFastImageProcessor):
        fast = ExactFastImageProcessor(ip)
        if fast.enabled:
            processor.image_processor = fast
    return processor


def installed(processor) -> bool:
    return isinstance(getattr(processor, "image_processor", None), ExactFastImageProcessor)


def counts(processor) -> Tuple[int, int]:
    """(fast calls, reference calls) of an installed fast processor (0, 0) otherwise."""
    ip = getattr(processor, "image_processor", None)
    if isinstance(ip, ExactFastImageProcessor):
        return ip.fast_calls, ip.reference_calls
    return 0, 0


__all__: Sequence[str] = ("ExactFastImageProcessor", "install", "installed", "patchify", "counts")

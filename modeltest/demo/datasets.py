"""Small TextVQA- and VideoBench-format datasets in the exact on-disk formats (README "Running on real weights and data")."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

# (word on the sign, question, the ten human answers)
TEXTVQA_ITEMS = [
    ("STOP", "what does the sign say?", ["stop"] * 8 + ["stop sign", "STOP"]),
    ("OPEN", "what word is written on the door?", ["open"] * 6 + ["Open", "open.", "opened", "open sign"]),
    (
        "CAFE 24",
        "what is the name of the shop?",
        ["cafe 24"] * 4 + ["cafe", "cafe24", "Cafe 24", "24", "cafe 24", "coffee"],
    ),
    ("EXIT", "what does the green sign read?", ["exit"] * 10),
    (
        "SALE 50%",
        "what is on sale?",
        ["50%"] * 3 + ["sale", "sale 50%", "50", "half", "50 percent", "everything", "clothes"],
    ),
    ("BUS 7", "which bus number is shown?", ["7"] * 5 + ["seven", "bus 7", "7.", "number 7", "7"]),
    ("NO PARKING", "what is not allowed here?", ["parking"] * 7 + ["no parking", "park", "cars"]),
    ("HOTEL", "what kind of building is this?", ["hotel"] * 9 + ["motel"]),
]

VIDEO_COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}

# subject -> list of (video name, question, choices with possible nulls, answer letter)
VIDEOBENCH_ITEMS: Dict[str, List] = {
    "ActivityNet": [
        ("v_demo_red", "What color is the moving square?", {"A": "red", "B": "green", "C": "blue", "D": "yellow"}, "A"),
        (
            "v_demo_blue",
            "Which direction does the square move?",
            {"A": "left", "B": "right", "C": "up", "D": "down"},
            "B",
        ),
        (
            "v_demo_green",
            "How many squares are there?",
            {"A": "one", "B": "two", "C": "three", "D": "four", "E": "none"},
            "A",
        ),
    ],
    "MSVD": [
        ("msvd_yellow", "Is the background dark?", {"A": "yes", "B": "no"}, "A"),
        (
            "msvd_red",
            "What shape moves across the screen?",
            {"A": "circle", "B": "square", "C": "triangle", "D": None},
            "B",
        ),
    ],
    "MOT": [
        (
            "mot_blue",
            "How many objects are tracked?",
            {"A": "1", "B": "2", "C": "3", "D": "4", "E": "5", "F": "6"},
            "A",
        ),
    ],
    "NBA": [
        ("nba_green", "What happens in the clip?", {"A": "a dunk", "B": "a free throw", "C": "a square moves"}, "C"),
        ("nba_red", "Which team scores?", {"A": "home", "B": "away", "C": "neither", "D": "both"}, "C"),
    ],
    "Driving-exam": [
        (
            "drive_yellow",
            "What should the driver do?",
            {"A": "stop", "B": "go", "C": "turn left", "D": "turn right", "E": "reverse"},
            "A",
        ),
    ],
    "SQA3D": [
        ("sqa_blue", "What is in front of me?", {"A": "a table", "B": "a chair", "C": "a square", "D": "a wall"}, "C"),
        ("sqa_green", "Can I sit on it?", {"A": "yes", "B": "no", "C": None}, "B"),
    ],
}
# ANSWER.json carries both answer forms found in the wild: a bare letter and {"answer": letter}.
LETTER_FORM_SUBJECTS = ("MSVD", "NBA", "SQA3D")


def _font_draw(img: Image.Image, text: str, xy, color) -> None:
    draw = ImageDraw.Draw(img)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=28)
    except TypeError:  # Pillow < 10.1 has no size argument
        font = None
    draw.text(xy, text, fill=color, font=font)


def build_textvqa(root: Path, seed: int = 0) -> Path:
    """images/*.jpg, textvqa_val.jsonl (relative image paths) and textvqa_val_annotations.json."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines, annotations = [], []
    for i, (word, question, answers) in enumerate(TEXTVQA_ITEMS):
        w, h = rng.choice([(224, 168), (280, 196), (196, 252)])
        bg = tuple(rng.randrange(40, 200) for _ in range(3))
        img = Image.new("RGB", (w, h), bg)
        ImageDraw.Draw(img).rectangle([10, h // 3, w - 10, 2 * h // 3], fill=(250, 250, 250))
        _font_draw(img, word, (20, h // 3 + 8), (10, 10, 10))
        name = f"demo_{i:03d}.jpg"
        img.save(root / "images" / name, quality=90)
        qid = 34600 + i
        lines.append({"image": f"images/{name}", "question": question, "question_id": qid, "answer": answers[0]})
        annotations.append(
            {
                "question_id": qid,
                "image_id": f"demo_{i:03d}",
                "question": question,
                "answers": [
                    {"answer": a, "answer_id": k + 1, "answer_confidence": "yes"} for k, a in enumerate(answers)
                ],
            }
        )
    with open(root / "textvqa_val.jsonl", "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    (root / "textvqa_val_annotations.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "annotations": annotations}), encoding="utf-8"
    )
    return root / "textvqa_val.jsonl"


def write_video(path: Path, color, seconds: float = 8.0, fps: int = 4, size: int = 112, seed: int = 0) -> None:
    """A short mp4 of a coloured square moving over a dark, noisy background (H.264 via PyAV)."""
    import av

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(n):
            frame = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            x = int((size - 32) * t / max(1, n - 1))
            frame[40:72, x : x + 32] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_videobench(root: Path, seed: int = 0) -> Path:
    """Eval_QA/{Subject}_QA_new.json + Eval_QA/answer/ANSWER.json + Eval_video/{Subject}/*.mp4.

    vid_path values are relative ("Eval_video/..."), as in the public files, and resolve against
    the Eval_QA folder's parent.
    """
    qa_dir = root / "Eval_QA"
    (qa_dir / "answer").mkdir(parents=True, exist_ok=True)
    answers: Dict[str, Dict] = {}
    k = 0
    for subject, items in VIDEOBENCH_ITEMS.items():
        entries, key = {}, {}
        for j, (video, question, choices, letter) in enumerate(items):
            color = next(c for name, c in VIDEO_COLORS.items() if name in video)
            rel = f"Eval_video/{subject}/{video}.mp4"
            if not (root / rel).exists():
                write_video(root / rel, color, seed=seed + k)
            k += 1
            qid = f"{video}_{j}"
            entries[qid] = {"vid_path": rel, "video_id": video, "question": question, "choices": choices}
            key[qid] = letter if subject in LETTER_FORM_SUBJECTS else {"answer": letter, "question": question}
        (qa_dir / f"{subject}_QA_new.json").write_text(json.dumps(entries, indent=1), encoding="utf-8")
        answers[subject] = key
    (qa_dir / "answer" / "ANSWER.json").write_text(json.dumps(answers, indent=1), encoding="utf-8")
    return qa_dir

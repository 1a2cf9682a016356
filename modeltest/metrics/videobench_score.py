"""VideoBench's three-group weighted score (from the benchmark's paper; README "Metrics")."""

from __future__ import annotations

from typing import Dict, Optional

# group -> {subject: weight}
GROUPS: Dict[str, Dict[str, float]] = {
    "Video-Exclusive": {
        "ActivityNet": 1.0,
        "MSVD": 1.0,
        "MSRVTT": 1.0,
        "TGIF": 1.0,
        "Youcook2": 1.0,
        "Ucfcrime": 1.0,
        "MOT": 0.5,
    },
    "Prior-Knowledge": {"TVQA": 1.0, "MV": 1.0, "NBA": 1.0},
    "Decision-making": {"Driving-exam": 0.5, "Driving-decision-making": 1.0, "SQA3D": 1.0},
}


def group_scores(subject_accuracy: Dict[str, float]) -> Dict[str, float]:
    """Weighted mean accuracy of each group over the subjects present; groups with none are left out."""
    out = {}
    for group, weights in GROUPS.items():
        present = {s: w for s, w in weights.items() if s in subject_accuracy}
        if present:
            total_w = sum(present.values())
            out[group] = sum(subject_accuracy[s] * w for s, w in present.items()) / total_w
    return out


def weighted_score(subject_accuracy: Dict[str, float]) -> Optional[float]:
    """Mean of the three group scores, or None unless every group has at least one subject."""
    groups = group_scores(subject_accuracy)
    if len(groups) < len(GROUPS):
        return None
    return sum(groups.values()) / len(groups)

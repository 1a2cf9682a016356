"""Public metric functions (stable names: other tools and tests call them).

- `vqa_accuracy(prediction, answers) -> float`: VQA accuracy of one TextVQA question, 0..1.
- `extract_choice(text, choices) -> str | None`: the option letter a model output names.
- `group_scores`, `weighted_score`: VideoBench's weighted three-group score.
"""

from .choice import extract_choice  # noqa: F401
from .videobench_score import GROUPS, group_scores, weighted_score  # noqa: F401
from .vqa import clean_answer, normalize_prediction, vqa_accuracy  # noqa: F401

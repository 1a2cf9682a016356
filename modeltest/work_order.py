"""In what order a replica computes its samples: questions on one image or clip together.

The engine reuses what one question on a medium computed (its prompt blocks in the prefix cache,
its vision embeddings in the vision cache) for the next question on it — while those are still
cached. Handing each replica whole groups of questions per medium, one group after another,
keeps the questions on a clip within a few passes of each other. Results, records, merging and
resuming are unchanged: records are keyed by sample, and the result files are written in
dataset order.
"""

from __future__ import annotations

import json
from typing import Dict, List, Tuple, TypeVar

from .core import Sample

T = TypeVar("T")


def medium_key(sample: Sample) -> str:
    """What two samples must share for one's prompt prefix and vision work to serve the other."""
    if not (sample.images or sample.videos):
        return f"text:{sample.id}"  # nothing to share but the system prompt: keep dataset order
    media = {"images": sample.images, "videos": sample.videos}
    options = {"image": sample.image_options, "video": sample.video_options}
    return json.dumps([media, options], sort_keys=True, default=str)


def share_by_medium(todo: List[Tuple[Sample, T]], replicas: int, rank: int) -> List[Tuple[Sample, T]]:
    """Replica `rank`'s share of `todo` (sample, key) pairs: whole medium groups, each to the
    replica with the fewest samples so far (ties to the lowest rank), groups in order of their
    first question. Every rank computes the same split."""
    groups: Dict[str, List[Tuple[Sample, T]]] = {}
    for item in todo:
        groups.setdefault(medium_key(item[0]), []).append(item)
    loads = [0] * replicas
    shares: List[List[Tuple[Sample, T]]] = [[] for _ in range(replicas)]
    for group in groups.values():
        i = min(range(replicas), key=lambda j: (loads[j], j))
        shares[i] += group
        loads[i] += len(group)
    return shares[rank]

"""What each backend can do, declared once. The config loader, the launcher, the harness, the
records and run_pa ask these questions instead of branching on a backend's name, so a new backend
is one entry here and one module beside this one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class BackendTraits:
    name: str
    tensor_parallel: bool  # one model replica over several processes (tp > 1)
    local_weights: bool  # reads model_path here (config.json, weights, data type); False: a served model
    local_media: bool  # decodes images/videos here (media cache, worker processes)
    engine_settings: bool  # takes the engine's KV and reuse settings (config.schema.ENGINE_SETTINGS)

    @property
    def served(self) -> bool:
        return not self.local_weights


TRAITS: Dict[str, BackendTraits] = {
    "engine": BackendTraits("engine", tensor_parallel=True, local_weights=True, local_media=True, engine_settings=True),
    "hf": BackendTraits("hf", tensor_parallel=False, local_weights=True, local_media=True, engine_settings=False),
    "openai": BackendTraits(
        "openai", tensor_parallel=False, local_weights=False, local_media=False, engine_settings=False
    ),
}
BACKENDS = tuple(TRAITS)
DEFAULT_BACKEND = "engine"  # its output files carry no backend suffix (outputs.run_variant)


def traits(name: str) -> BackendTraits:
    """The traits of a backend by name (the config loader has already refused an unknown one)."""
    return TRAITS[name]

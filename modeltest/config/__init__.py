from .loader import EvalConfig, load_config, resolve_data_type  # noqa: F401
from .schema import DATA_TYPES, InferParams, MMModelConfig, ModelConfig, RunConfig, TaskConfig  # noqa: F401

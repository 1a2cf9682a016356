"""modeltest: accuracy and speed evaluation of Qwen2-VL deployments."""

__version__ = "0.1.0"

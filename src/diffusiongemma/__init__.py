"""diffusiongemma: run, serve and train DiffusionGemma block-diffusion language models."""

from .cache import KVCache
from .config import ConfigError, GenerationConfig, ModelConfig, TextConfig, VisionConfig
from .loader import Checkpoint, CheckpointError, load, save

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CheckpointError", "ConfigError", "GenerationConfig", "KVCache", "ModelConfig",
    "TextConfig", "VisionConfig", "load", "save",
]

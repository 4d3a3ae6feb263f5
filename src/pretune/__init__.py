"""pretune: pre-train, then fine-tune, transformer language models."""

from .config.model import ModelConfig
from .config.presets import PRESETS, preset
from .errors import PretuneError
from .models.counting import count_params
from .models.transformer import Transformer

__all__ = ["ModelConfig", "count_params", "preset", "PRESETS", "PretuneError", "Transformer"]
__version__ = "0.1.0"

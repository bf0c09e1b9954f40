"""mllm-mod: Mixture-of-Depths for multimodal LLMs on stock Hugging Face transformers."""

__version__ = "0.1.0"

from .adapters import adapter_for, supported_model_types
from .arank import ARankReport, arank  # the function shadows the module name, as the API asks
from .config import PRESETS, MoDConfig, preset
from .efficiency import EfficiencyReport, efficiency
from .importers import import_checkpoint
from .layer import MoDLayer, RoutingContext
from .retrofit import (
    from_pretrained,
    layer_ratios,
    load_mod,
    mod_state_dict,
    retrofit,
    save_mod,
    unload,
)

__all__ = [
    "ARankReport",
    "PRESETS",
    "EfficiencyReport",
    "MoDConfig",
    "MoDLayer",
    "RoutingContext",
    "__version__",
    "adapter_for",
    "arank",
    "efficiency",
    "from_pretrained",
    "import_checkpoint",
    "layer_ratios",
    "load_mod",
    "mod_state_dict",
    "preset",
    "retrofit",
    "save_mod",
    "supported_model_types",
    "unload",
]

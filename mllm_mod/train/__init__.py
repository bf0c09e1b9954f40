"""Fine-tuning: `TrainConfig` (YAML + typed overrides), `MoDTrainer` (HF Trainer with the routing-loss
hook and a router learning rate), the recipe `train(config)`, and the shipped DeepSpeed configs."""

from .config import TrainConfig, load_config
from .params import param_groups, router_parameter_names, set_trainable
from .recipe import DEEPSPEED_CONFIGS, TrainResult, deepspeed_config, train
from .trainer import MoDTrainer

__all__ = [
    "DEEPSPEED_CONFIGS",
    "MoDTrainer",
    "TrainConfig",
    "TrainResult",
    "deepspeed_config",
    "load_config",
    "param_groups",
    "router_parameter_names",
    "set_trainable",
    "train",
]

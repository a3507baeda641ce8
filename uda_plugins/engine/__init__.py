from .checkpoint import UDACheckpointer
from .predictor import Predictor
from .setup import resolve_device, setup_cfg
from .step import NonFiniteLossError, UDAStepRunner
from .trainer import UDATrainer, unwrap_model

__all__ = [
    "Predictor",
    "UDACheckpointer",
    "UDATrainer",
    "UDAStepRunner",
    "NonFiniteLossError",
    "setup_cfg",
    "resolve_device",
    "unwrap_model",
]

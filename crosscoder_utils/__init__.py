"""Model diffing with crosscoders: collect paired activations, train a crosscoder, read off the diff."""

from .collect import collect_activations
from .config import CollectConfig, CrossCoderConfig, OrganismConfig, TrainConfig
from .crosscoder import CrossCoder
from .models import load_model_pair
from .normalize import estimate_norm_factors
from .notebook import setup_notebook
from .source import ModelSource
from .store import ActivationStore

__all__ = [
    "load_model_pair",
    "collect_activations",
    "ActivationStore",
    "ModelSource",
    "estimate_norm_factors",
    "CrossCoder",
    "CrossCoderConfig",
    "train_crosscoder",
    "CollectConfig",
    "TrainConfig",
    "OrganismConfig",
    "setup_notebook",
]


def __getattr__(name: str):
    # imported on first use, so that `python -m crosscoder_utils.train` runs that module only once
    if name == "train_crosscoder":
        from .train import train_crosscoder

        return train_crosscoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

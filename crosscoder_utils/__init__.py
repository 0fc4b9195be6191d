"""Model diffing with crosscoders: collect paired activations, train a crosscoder, read off the diff."""
from .collect import collect_activations
from .config import CollectConfig, CrossCoderConfig, OrganismConfig, TrainConfig
from .crosscoder import CrossCoder
from .models import load_model_pair
from .normalize import estimate_norm_factors
from .store import ActivationStore, Buffer
from .train import train_crosscoder

__all__ = ["load_model_pair", "collect_activations", "ActivationStore", "Buffer", "estimate_norm_factors",
           "CrossCoder", "CrossCoderConfig", "train_crosscoder", "CollectConfig", "TrainConfig", "OrganismConfig"]

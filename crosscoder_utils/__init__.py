"""Model diffing with crosscoders: collect paired activations, train a crosscoder, read off the diff."""
from .collect import collect_activations
from .config import CollectConfig
from .models import load_model_pair
from .store import ActivationStore, Buffer

__all__ = ["load_model_pair", "collect_activations", "ActivationStore", "Buffer", "CollectConfig"]

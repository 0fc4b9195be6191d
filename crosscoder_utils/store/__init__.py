"""The paired activation store: ``format`` (what is on disk), ``writer`` (writing it in resumable shards),
``reader`` (``ActivationStore``: rows and shuffled batches, from local disk or streamed from fsspec URLs and
the Hub). Pushing a store to the Hub is ``hub.push_store``."""

from .reader import ActivationStore
from .writer import StoreWriter, local_path

__all__ = ["ActivationStore", "StoreWriter", "local_path"]

"""The paired activation store: ``format`` (what is on disk), ``writer`` (writing it in resumable shards),
``reader`` (``ActivationStore``: rows and shuffled batches), ``remote`` (streaming from fsspec URLs and
the Hub, ``push_to_hub``)."""

from .reader import ActivationStore
from .remote import push_to_hub
from .writer import StoreWriter, local_path

__all__ = ["ActivationStore", "StoreWriter", "local_path", "push_to_hub"]

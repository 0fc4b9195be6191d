"""Stores away from local disk: streaming a remote store shard by shard, and pushing one to the Hub."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import numpy as np

from ..notebook import progress
from .rows import groups, rank_share

if TYPE_CHECKING:
    from .reader import ActivationStore


def prefetching(
    store: "ActivationStore", windows: Iterator[np.ndarray], first_row: int, process: tuple[int, int]
) -> Iterator[np.ndarray]:
    """Yield the windows; for a remote store, download the next window's shards in the background while
    this one is read: those holding this rank's share of its rows (``process``, as ``batches`` splits each
    batch), and none for windows that end before row ``first_row`` of the pass."""
    done, upcoming = 0, next(windows, None)
    while upcoming is not None:
        window, upcoming = upcoming, next(windows, None)
        done += len(window)
        if store.remote and upcoming is not None and done + len(upcoming) > first_row:
            for s, _ in groups(rank_share(upcoming, process), store.shard_starts):
                if not store.cached(s):
                    store.pending[s] = store.downloads.submit(store.load_shard, s)
        yield window


def push_to_hub(
    store: "ActivationStore",
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    shards_per_commit: int = 50,
) -> str:
    """Upload a local, complete store to a Hub dataset repo; returns the URL that opens it,
    ``hf://datasets/<repo_id>``.

    Shards go up ``shards_per_commit`` to a commit, those already there are skipped, and meta.json
    (listing the shards, with norm.json) comes last: an interrupted push resumes where it stopped, and
    the repo opens as a store only once it is whole. A repo that holds another store is refused.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if store.remote:
        raise ValueError(f"push_to_hub uploads a local store; {store.path} is not one (copy it locally first)")
    api, url = HfApi(token=token), f"hf://datasets/{repo_id}"
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    files = set(api.list_repo_files(repo_id, repo_type="dataset"))
    if "progress.json" in files:
        theirs = json.loads(fsspec.filesystem("hf", token=token).cat_file(f"datasets/{repo_id}/progress.json"))
        if theirs["settings"] != store.meta["settings"]:
            raise ValueError(f"{url} holds another store (other collection settings); push to a new repo")
    todo = [name for name in store.shard_names if f"shards/{name}/state.json" not in files]
    for first in progress(range(0, len(todo), shards_per_commit), desc="push shards", unit="commit"):
        names = todo[first : first + shards_per_commit]
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=store.path,
            allow_patterns=["progress.json"] + [f"shards/{name}/*" for name in names],
            commit_message=f"shards {names[0]} to {names[-1]}",
        )
    last = [CommitOperationAdd("meta.json", json.dumps(store.meta, indent=2).encode())]  # lists the shards
    norm = Path(store.path) / "norm.json"
    if norm.exists():
        last.append(CommitOperationAdd("norm.json", str(norm)))
    api.create_commit(repo_id, last, repo_type="dataset", commit_message="meta.json: the store is complete")
    return url

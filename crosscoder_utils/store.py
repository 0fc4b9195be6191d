"""The on-disk paired activation store, and the on-the-fly ``Buffer``.

Layout of a store directory::

    meta.json                written last: its presence means the store is complete
    norm.json                the norm scale factors (02_normalize)
    progress.json            collection progress (settings, blocks done, statistics so far), for resuming
    shards/shard_00000/ ...  HF datasets (``save_to_disk``), one row per token; shard b holds block b:
                             acts      flat fixed-length list of n_models * d_model values
                             token_id  int64, seq int64 (sequence index), pos int32 (position in it)

A shard is written under a temporary name and renamed when complete, so a killed collection leaves
only complete shards, and a re-run with the same settings continues after the last of them.
Stores are written on local disk; a complete one can be copied anywhere fsspec reaches, or pushed to a
Hub dataset repo (``push_to_hub``), and read from there, streamed shard by shard.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import torch
from datasets.filesystems import is_remote_filesystem
from datasets.table import InMemoryTable, MemoryMappedTable
from einops import rearrange
from tqdm.auto import tqdm


def write_json(path: Path, value: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def to_storage(activations: torch.Tensor, dtype: str) -> np.ndarray:
    """[n, n_models, d_model] float -> [n, n_models * d_model] numpy in the storage dtype."""
    # datasets has no bfloat16: its bits are kept, bit-exact, as int16
    stored = activations.to(torch.bfloat16).view(torch.int16) if dtype == "bfloat16" else activations.to(getattr(torch, dtype))
    return rearrange(stored, "n model d -> n (model d)").cpu().numpy()


def from_storage(flat: np.ndarray, dtype: str, n_models: int) -> torch.Tensor:
    """[n, n_models * d_model] stored values -> float32 [n, n_models, d_model]."""
    values = torch.from_numpy(flat)
    values = values.view(torch.bfloat16) if dtype == "bfloat16" else values
    return rearrange(values.float(), "n (model d) -> n model d", model=n_models)


def local_path(path: str | Path) -> Path:
    """The directory a store is written to: a local path (or file:// URL); a remote URL is refused."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if is_remote_filesystem(fs):
        raise ValueError(f"stores are written on local disk, not to {path}: write it locally, then copy it there "
                         "or push it (ActivationStore.push_to_hub), and read it from the URL")
    return Path(root)


class StoreWriter:
    """Writes a store in complete shards and keeps running per-model statistics.

    Shard b holds block b of the collection (``seqs_per_shard`` sequences, or ``shard_size`` rows); a
    block whose every token was excluded writes no shard. ``write_shard`` writes one shard and returns
    its statistics; ``record`` adds statistics to progress.json once every block up to ``n_blocks`` is
    written (under torchrun, ranks write their blocks side by side and rank 0 records).
    ``settings`` identify what is being written; an existing directory with other settings is refused,
    so a store is never mixed from two collections.
    """

    def __init__(self, path: str | Path, settings: dict, n_models: int, d_model: int, dtype: str):
        self.path, self.settings, self.dtype = local_path(path), settings, dtype
        self.n_models, self.d_model = n_models, d_model
        self.shards = self.path / "shards"
        progress_file = self.path / "progress.json"
        if (self.path / "meta.json").exists() or progress_file.exists():
            progress = json.loads(progress_file.read_text())
            if progress["settings"] != settings:
                differ = sorted(k for k in settings.keys() | progress["settings"].keys()
                                if settings.get(k) != progress["settings"].get(k))
                raise ValueError(
                    f"{self.path} already holds a store written with other settings (differing: {differ}); "
                    "pass another store_dir, or delete that one to start over"
                )
            self.progress = progress
        elif self.path.exists() and any(self.path.iterdir()):
            raise ValueError(f"{self.path} exists and is not an activation store; pass an empty or new store_dir")
        else:
            self.progress = {
                "settings": settings, "n_blocks": 0, "n_shards": 0, "n_tokens": 0,
                "sum": np.zeros((n_models, d_model)).tolist(), "sum_norm": [0.0] * n_models,
            }
        if self.complete:
            return
        if "n_blocks" not in self.progress:
            raise ValueError(f"{self.path} holds an interrupted collection by an older version of this project, "
                             "which cannot be resumed; delete it to start over")
        for shard in self.shards.glob("*shard_*"):  # shards a killed run did not finish or did not record
            if shard.name.startswith(".tmp_") or int(shard.name[-5:]) >= self.progress["n_blocks"]:
                shutil.rmtree(shard)
        self.shards.mkdir(parents=True, exist_ok=True)
        if not progress_file.exists():  # from now on the directory is recognisably this store
            write_json(progress_file, self.progress)

    @property
    def complete(self) -> bool:
        return (self.path / "meta.json").exists()

    def write_shard(self, activations: torch.Tensor, token_ids, seq, pos, block: int) -> torch.Tensor:
        """Write block ``block``'s rows: activations [n, n_models, d_model]; token_ids, seq, pos [n].
        Returns its statistics as float64 [n_models·d_model sums, n_models norm sums, n_tokens, n_shards]."""
        stats = torch.zeros(self.n_models * self.d_model + self.n_models + 2, dtype=torch.float64)
        if len(activations) == 0:  # every token of this block was excluded
            return stats
        if not torch.isfinite(activations).all():
            bad = (~torch.isfinite(activations)).any(-1).nonzero()[0].tolist()
            raise ValueError(f"non-finite activations (NaN or inf) at row {bad[0]}, model {bad[1]}; nothing of this shard was written")
        flat = to_storage(activations, self.dtype)
        table = pa.table({
            "acts": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
            "token_id": pa.array(np.asarray(token_ids, dtype=np.int64)),
            "seq": pa.array(np.asarray(seq, dtype=np.int64)),
            "pos": pa.array(np.asarray(pos, dtype=np.int32)),
        })
        name = f"shard_{block:05d}"
        datasets.disable_progress_bars()
        datasets.Dataset(InMemoryTable(table)).save_to_disk(str(self.shards / f".tmp_{name}"))
        datasets.enable_progress_bars()
        os.replace(self.shards / f".tmp_{name}", self.shards / name)
        acts64 = activations.double().cpu()
        return torch.cat([acts64.sum(0).flatten(), acts64.norm(dim=-1).sum(0), torch.tensor([len(activations), 1.0])])

    def record(self, stats: torch.Tensor, n_blocks: int) -> None:
        """Add the statistics of written shards to progress.json: blocks before ``n_blocks`` are done."""
        progress, nd = self.progress, self.n_models * self.d_model
        progress["sum"] = (np.array(progress["sum"]) + stats[:nd].view(self.n_models, self.d_model).numpy()).tolist()
        progress["sum_norm"] = (np.array(progress["sum_norm"]) + stats[nd:-2].numpy()).tolist()
        progress["n_tokens"] += int(stats[-2])
        progress["n_shards"] += int(stats[-1])
        progress["n_blocks"] = n_blocks
        write_json(self.path / "progress.json", progress)

    def finish(self, **meta) -> "ActivationStore":
        """Write meta.json, which marks the store complete, and open it."""
        n = self.progress["n_tokens"]
        if n == 0:
            raise ValueError("no tokens were written: the data is empty, or every token was excluded")
        meta = {
            **meta, "n_tokens": n, "dtype": self.dtype, "n_shards": self.progress["n_shards"],
            "mean": (np.array(self.progress["sum"]) / n).tolist(),
            "mean_norm": (np.array(self.progress["sum_norm"]) / n).tolist(),
            "settings": self.settings, "shards": shard_rows(self.shards),
        }
        write_json(self.path / "meta.json", meta)
        return ActivationStore(self.path)


class Shard(NamedTuple):
    """One shard's columns as zero-copy numpy views of its record batches (``starts``: each batch's first row)."""
    starts: np.ndarray
    columns: dict[str, list[np.ndarray]]


def open_shard(fs: fsspec.AbstractFileSystem, directory: str) -> pa.Table:
    """The table of a shard written by ``save_to_disk``: memory-mapped when local, downloaded when remote."""
    files = json.loads(fs.cat_file(f"{directory}/state.json"))["_data_files"]
    tables = [InMemoryTable.from_buffer(pa.py_buffer(fs.cat_file(f"{directory}/{f['filename']}")))
              if is_remote_filesystem(fs) else MemoryMappedTable.from_file(f"{directory}/{f['filename']}") for f in files]
    return pa.concat_tables([t.table for t in tables])


def shard_rows(directory: Path) -> list[list]:
    """[[name, n_rows], ...] of the complete shards under a local ``directory``, in order."""
    fs = fsspec.filesystem("file")
    return [[shard.name, open_shard(fs, str(shard)).num_rows] for shard in sorted(directory.glob("shard_*"))]


class ActivationStore:
    """Paired activations of ``n_models`` models at one site, one row per token.

    ``path`` is a local directory or any fsspec URL: ``hf://datasets/owner/name`` (a Hub dataset repo,
    ``@revision`` after the name), ``s3://``, ``gs://``, ``http(s)://`` ... A remote store is streamed:
    a pass visits the shards in windows of at least ``window_rows`` rows shuffled together; the next
    window's shards download in the background while one is read, and a shard is kept while two
    windows' worth of rows fit (least recently used dropped first), so a pass downloads each shard
    once and memory holds about three windows. Prefix ``simplecache::`` to the URL to keep the
    downloaded files on local disk for later passes.

    ``meta`` holds: models, site, layer, d_model, n_models, dtype, n_tokens, exclusions, dataset,
    val_fraction, per-model ``mean`` [n_models][d_model] and ``mean_norm`` [n_models], settings,
    shards ([name, n_rows] of each).
    """

    def __init__(self, path: str | Path, window_rows: int = 2**16):
        self.fs, root = fsspec.core.url_to_fs(str(path))
        self.remote = is_remote_filesystem(self.fs)
        self.path, self.root, self.window_rows = str(path) if self.remote else Path(root), root, window_rows
        self.meta = self.read_json("meta.json")
        if self.meta is None:
            hint = (" A collection into it was interrupted: re-run it with the same arguments to resume."
                    if self.fs.exists(f"{root}/progress.json") else "")
            raise FileNotFoundError(f"no complete activation store at {self.path} (meta.json is missing).{hint}")
        if "shards" not in self.meta:  # written before meta listed its shards: count them
            if self.remote:
                raise ValueError(f"{self.path} was written before stores listed their shards in meta.json; open a local "
                                 "copy with this version and push_to_hub it, or read it locally")
            self.meta["shards"] = shard_rows(Path(root) / "shards")
        names, sizes = zip(*self.meta["shards"]) if self.meta["shards"] else ((), ())
        missing = [] if self.remote else [n for n in names if not (Path(root) / "shards" / n).is_dir()]
        if len(names) != self.meta["n_shards"] or sum(sizes) != self.meta["n_tokens"] or missing:
            raise ValueError(f"{self.path} should hold {self.meta['n_shards']} shards of {self.meta['n_tokens']} rows in all, "
                             f"but its shards are incomplete or missing {missing[:3]}; collect or copy it again")
        self.n_models, self.d_model = self.meta["n_models"], self.meta["d_model"]
        self._names, self._sizes = names, np.array(sizes, dtype=np.int64)
        self._starts = np.cumsum(np.concatenate([[0], self._sizes]))[:-1]
        self._cache: OrderedDict[int, Shard] = OrderedDict()
        self._pending: dict[int, Future] = {}  # shards being downloaded in the background
        self._downloads = ThreadPoolExecutor(4, thread_name_prefix="store-download")

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the store (``meta.json``, ``norm.json`` ...), or None when it has none."""
        try:
            return json.loads(self.fs.cat_file(f"{self.root}/{name}"))
        except FileNotFoundError:
            return None

    def write_json(self, name: str, value: dict) -> None:
        """Write a JSON file into the store (atomically when local)."""
        if self.remote:
            self.fs.pipe_file(f"{self.root}/{name}", json.dumps(value, indent=2).encode())
        else:
            write_json(self.path / name, value)

    def _load(self, s: int) -> Shard:
        try:
            table = open_shard(self.fs, f"{self.root}/shards/{self._names[s]}")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"shard {self._names[s]} of the store at {self.path} is missing") from error
        batches = table.to_batches()
        columns = {name: [(batch.column(name).flatten().to_numpy().reshape(len(batch), -1) if name == "acts"
                           else batch.column(name).to_numpy()) for batch in batches] for name in table.column_names}
        return Shard(np.cumsum([0] + [len(b) for b in batches])[:-1], columns)

    def _shard(self, s: int) -> Shard:
        if s not in self._cache:
            pending = self._pending.pop(s, None)
            self._cache[s] = pending.result() if pending else self._load(s)
            while self._sizes[list(self._cache)].sum() > 2 * (self.window_rows + self._sizes.max()):
                self._cache.popitem(last=False)
        self._cache.move_to_end(s)
        return self._cache[s]

    def _prefetching(self, windows: Iterator[np.ndarray], first_row: int, part: tuple[int, int]) -> Iterator[np.ndarray]:
        """Yield the windows; for a remote store, download the next window's shards in the background
        while this one is read: those holding this rank's share of its rows (``part``, as ``batches``
        splits each batch), and none for windows that end before row ``first_row`` of the pass."""
        done, upcoming = 0, next(windows, None)
        while upcoming is not None:
            window, upcoming = upcoming, next(windows, None)
            done += len(window)
            if self.remote and upcoming is not None and done + len(upcoming) > first_row:
                for s, _ in groups(rank_share(upcoming, part), self._starts):
                    if s not in self._cache and s not in self._pending:
                        self._pending[s] = self._downloads.submit(self._load, s)
            yield window

    @classmethod
    def from_arrays(cls, path, activations, token_ids=None, shard_size: int = 65536, val_fraction: float = 0.05,
                    dtype: str = "float32", **meta) -> "ActivationStore":
        """Write a store from activations you already have: [n, n_models, d_model] (tensor or array)."""
        activations = torch.as_tensor(activations)
        if activations.ndim != 3 or activations.shape[1] < 2 or len(activations) == 0:
            raise ValueError(f"activations must be [n_tokens > 0, n_models >= 2, d_model], got {tuple(activations.shape)}")
        n, n_models, d_model = activations.shape
        token_ids = np.full(n, -1) if token_ids is None else np.asarray(token_ids)
        if len(token_ids) != n:
            raise ValueError(f"token_ids has {len(token_ids)} entries for {n} activation rows")
        meta = {"models": [f"model_{m}" for m in range(n_models)], "site": None, "layer": None, **meta,
                "n_models": n_models, "d_model": d_model, "val_fraction": val_fraction}
        writer = StoreWriter(path, {"from_arrays": n, "shard_size": shard_size}, n_models, d_model, dtype)
        if writer.complete:
            raise ValueError(f"{path} already holds a complete store; pass a new path")
        rows = np.arange(n)
        for block in range(writer.progress["n_blocks"], -(-n // shard_size)):
            part = slice(block * shard_size, (block + 1) * shard_size)
            stats = writer.write_shard(activations[part], token_ids[part], rows[part], np.zeros_like(rows[part]), block)
            writer.record(stats, n_blocks=block + 1)
        return writer.finish(**meta)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    shards_per_commit: int = 50) -> str:
        """Upload this local, complete store to a Hub dataset repo; returns the URL that opens it,
        ``hf://datasets/<repo_id>``.

        Shards go up ``shards_per_commit`` to a commit, those already there are skipped, and meta.json
        (listing the shards, with norm.json) comes last: an interrupted push resumes where it stopped, and
        the repo opens as a store only once it is whole. A repo that holds another store is refused.
        """
        from huggingface_hub import CommitOperationAdd, HfApi

        if self.remote:
            raise ValueError(f"push_to_hub uploads a local store; {self.path} is not one (copy it locally first)")
        api, url = HfApi(token=token), f"hf://datasets/{repo_id}"
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        files = set(api.list_repo_files(repo_id, repo_type="dataset"))
        if "progress.json" in files:
            theirs = json.loads(fsspec.filesystem("hf", token=token).cat_file(f"datasets/{repo_id}/progress.json"))
            if theirs["settings"] != self.meta["settings"]:
                raise ValueError(f"{url} holds another store (other collection settings); push to a new repo")
        todo = [name for name in self._names if f"shards/{name}/state.json" not in files]
        for first in tqdm(range(0, len(todo), shards_per_commit), desc="push shards", unit="commit"):
            names = todo[first:first + shards_per_commit]
            api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=self.path,
                              allow_patterns=["progress.json"] + [f"shards/{name}/*" for name in names],
                              commit_message=f"shards {names[0]} to {names[-1]}")
        last = [CommitOperationAdd("meta.json", json.dumps(self.meta, indent=2).encode())]  # lists the shards
        if (self.path / "norm.json").exists():
            last.append(CommitOperationAdd("norm.json", str(self.path / "norm.json")))
        api.create_commit(repo_id, last, repo_type="dataset", commit_message="meta.json: the store is complete")
        return url

    def __len__(self) -> int:
        return self.meta["n_tokens"]

    def _take(self, indices, column: str) -> np.ndarray:
        """The values of one column at ``indices``, in the order asked for, read shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        values = np.concatenate([shard.columns[column][b][rows]
                                 for s, in_shard in groups(indices[order], self._starts) for shard in [self._shard(s)]
                                 for b, rows in groups(in_shard, shard.starts)])
        if np.any(np.diff(order) < 0):  # not asked for in sorted order: put the values back in the order asked
            values[order] = values.copy()
        return values

    def read(self, indices) -> torch.Tensor:
        """float32 [len(indices), n_models, d_model] in the order asked for."""
        return from_storage(self._take(indices, "acts"), self.meta["dtype"], self.n_models)

    def token_ids(self, indices) -> torch.Tensor:
        """int64 [len(indices)]: the token each row was read at."""
        return torch.from_numpy(self._take(indices, "token_id"))

    def positions(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence index, position in the sequence) of each row, each int64 [len(indices)]."""
        return torch.from_numpy(self._take(indices, "seq")), torch.from_numpy(self._take(indices, "pos")).long()

    def split_range(self, split: str) -> range:
        """Rows of a split: ``train`` is the first rows, ``val`` the last ``val_fraction`` of the store."""
        n_val = int(len(self) * self.meta["val_fraction"])
        ranges = {"train": range(0, len(self) - n_val), "val": range(len(self) - n_val, len(self)), "all": range(len(self))}
        if split not in ranges:
            raise ValueError(f"split={split!r} is not one of {list(ranges)}")
        return ranges[split]

    def shuffled_indices(self, split: str = "train", seed: int = 0) -> Iterator[np.ndarray]:
        """Row indices of one pass over a split, shuffled within windows of whole shards.

        The shards are visited in a random order, and the rows of each window of shards (at least
        ``window_rows`` rows) are permuted together: each shard is read once per pass, whether it lies
        on local disk or is streamed, with no permutation of the whole store in memory.
        """
        rows = self.split_range(split)
        rng = np.random.default_rng(seed)
        window = []
        for s in rng.permutation(len(self._sizes)):
            first, stop = max(self._starts[s], rows.start), min(self._starts[s] + self._sizes[s], rows.stop)
            window += [np.arange(first, stop)] if first < stop else []
            if sum(map(len, window)) >= self.window_rows:
                yield rng.permutation(np.concatenate(window))
                window = []
        if window:
            yield rng.permutation(np.concatenate(window))

    def batches(self, batch_size: int, seed: int = 0, split: str = "train", start_batch: int = 0,
                part: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        """One pass of shuffled float32 [batch, n_models, d_model] batches (an incomplete last batch is dropped).

        ``start_batch`` skips that many batches without reading them, so a resumed run sees exactly the
        batches an uninterrupted one would. ``part=(rank, world_size)`` reads only that rank's share of
        each batch (disjoint rows; the shares of all ranks together are the batch).
        """
        windows = self._prefetching(self.shuffled_indices(split, seed), start_batch * batch_size, part)
        for number, indices in enumerate(index_batches(windows, batch_size)):
            if number >= start_batch:
                yield self.read(rank_share(indices, part))

    def n_batches(self, batch_size: int, split: str = "train") -> int:
        return len(self.split_range(split)) // batch_size


def rank_share(indices: np.ndarray, part: tuple[int, int]) -> np.ndarray:
    """The sorted rows of ``indices`` that fall to rank ``part[0]`` of ``part[1]``: a contiguous range of them
    (sorted, so reads stay in order on disk)."""
    rank, world = part
    return np.array_split(np.sort(indices), world)[rank]


def groups(ordered: np.ndarray, starts: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split sorted row numbers by the unit (shard, record batch) they fall in, given each unit's first row:
    [(unit, rows counted from the unit's start), ...]."""
    edges = np.append(np.searchsorted(ordered, starts), len(ordered))
    return [(u, ordered[edges[u]:edges[u + 1]] - starts[u]) for u in np.flatnonzero(edges[1:] > edges[:-1])]


def index_batches(windows: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Cut a stream of index windows into batches of exactly ``batch_size``."""
    pending = np.empty(0, dtype=np.int64)
    for window in windows:
        pending = np.concatenate([pending, window])
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]


class Buffer:
    """Shuffled batches served on the fly from a stream of fresh activations, without a store.

    ``source`` yields float32 tensors [n, n_models, d_model] (for example ``collect.iter_activations``).
    The buffer holds ``size`` rows; when half of them have been served it drops exactly the served
    rows, refills with fresh ones and reshuffles, so no row is ever served twice (unlike the public
    Gemma replication's buffer, which re-serves its first fill).
    """

    def __init__(self, source: Iterable[torch.Tensor], size: int, batch_size: int, seed: int = 0):
        if size < 2 * batch_size:
            raise ValueError(f"buffer size ({size}) must be at least twice batch_size ({batch_size})")
        self.source, self.size, self.batch_size = iter(source), size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = torch.empty(0)
        self.spare = torch.empty(0)
        self.served = 0

    def _refill(self) -> None:
        keep = self.rows[self.served:]
        parts, have = [keep, self.spare], len(keep) + len(self.spare)
        while have < self.size:
            fresh = next(self.source, None)
            if fresh is None:
                break
            parts.append(fresh.float())
            have += len(fresh)
        rows = torch.cat([p for p in parts if p.numel()]) if have else torch.empty(0)
        self.rows, self.spare = rows[: self.size], rows[self.size:]
        self.rows = self.rows[torch.randperm(len(self.rows), generator=self.generator)]
        self.served = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._refill()
        while len(self.rows) - self.served >= self.batch_size:
            yield self.rows[self.served:self.served + self.batch_size]
            self.served += self.batch_size
            if self.served >= self.size // 2:
                self._refill()

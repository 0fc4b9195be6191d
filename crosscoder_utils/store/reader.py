"""Reading a store: rows by index, and shuffled batches that visit each shard once per pass."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import fsspec
import numpy as np
import torch
from datasets.filesystems import is_remote_filesystem

from ..config import check_range
from ..files import parse_json, write_json
from ..notebook import progress
from .format import STORAGE_TYPES, checksum, from_storage, open_shard, shard_buffers
from .rows import groups, index_batches, rank_share
from .writer import write_arrays

META_KEYS = tuple(
    "models site layer n_models d_model dtype val_fraction n_tokens n_shards mean mean_norm settings identity "
    "shards".split()
)
"""What every store's meta.json holds (the writer's ``finish`` and ``write_arrays``); opening refuses one lacking
any."""


class Shard(NamedTuple):
    """One shard's columns as zero-copy numpy views of its record batches (``starts``: each batch's first row)."""

    starts: np.ndarray
    columns: dict[str, list[np.ndarray]]


class ActivationStore:
    """Paired activations of ``n_models`` models at one site, one row per token.

    ``path`` is a local directory or any fsspec URL: ``hf://datasets/owner/name`` (a Hub dataset repo,
    ``@revision`` after the name), ``s3://``, ``gs://``, ``http(s)://`` ... A remote store is streamed:
    a pass visits the shards in windows of at least ``window_rows`` rows shuffled together; the next
    window's shards download in the background while one is read (``prefetching``), and a shard
    is kept while two windows' worth of rows fit (least recently used dropped first), so a pass
    downloads each shard once and memory holds about three windows. Prefix ``simplecache::`` to the URL
    to keep the downloaded files on local disk for later passes.

    ``meta`` holds: models, site, layer, d_model, n_models, dtype, n_tokens, exclusions, dataset,
    val_fraction, per-model ``mean`` [n_models][d_model] and ``mean_norm`` [n_models], settings,
    shards ([name, n_rows, sha256] of each).

    Opening a local store checks each shard's header (its activations' storage type and width, its row count)
    against meta.json; each shard's first read checks its data files against their sha256 in meta.json (bytes the
    read pulls in anyway: bench/RESULTS.md, "Shard checks"). ``verify=True`` checks every shard's checksum on
    opening (``verify``), which reads the whole store.
    """

    def __init__(self, path: str | Path, window_rows: int = 2**16, verify: bool = False):
        self.fs, self.root = fsspec.core.url_to_fs(str(path))
        self.remote = is_remote_filesystem(self.fs)
        self.path = str(path) if self.remote else self.root
        """Where the store is: its URL, or its local directory."""
        self.window_rows = window_rows
        self.meta = self.read_json("meta.json", META_KEYS)
        if self.meta is None:
            interrupted = self.fs.exists(f"{self.root}/progress.json")
            hint = " A collection into it was interrupted: re-run it with the same arguments to resume." * interrupted
            raise FileNotFoundError(f"no complete activation store at {self.path} (meta.json is missing).{hint}")
        if self.meta["dtype"] not in STORAGE_TYPES:
            raise ValueError(
                f"{self.root}/meta.json gives dtype {self.meta['dtype']!r}, not one of {list(STORAGE_TYPES)}: the file "
                "is damaged; collect or copy the store again"
            )
        names, sizes, self.checksums = zip(*self.meta["shards"]) if self.meta["shards"] else ((), (), ())
        missing = [] if self.remote else [n for n in names if not (Path(self.root) / "shards" / n).is_dir()]
        if len(names) != self.meta["n_shards"] or sum(sizes) != self.meta["n_tokens"] or missing:
            raise ValueError(
                f"{self.path} should hold {self.meta['n_shards']} shards of {self.meta['n_tokens']} rows in all, "
                f"but its shards are incomplete or missing {missing[:3]}; collect or copy it again"
            )
        self.n_models, self.d_model = self.meta["n_models"], self.meta["d_model"]
        self.shard_names, self.shard_sizes = names, np.array(sizes, dtype=np.int64)
        self.shard_starts = np.cumsum(np.concatenate([[0], self.shard_sizes]))[:-1]
        self._cache: OrderedDict[int, Shard] = OrderedDict()
        self.pending: dict[int, Future] = {}
        """Shards being downloaded in the background (remote stores)."""
        self.downloads = ThreadPoolExecutor(4, thread_name_prefix="store-download")
        self.checked: set[int] = set()
        """Shards whose data files matched their checksum (each shard's first read checks it)."""
        if not self.remote:  # a remote shard's header would cost its download: checked when it is read
            for s in range(len(names)):
                self.check_header(s, self.open(s)[0])
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard's data files against the sha256 that meta.json records for it, now (those read
        before too: a file may have changed since)."""
        self.checked.clear()
        for s in progress(range(len(self.shard_names)), desc="verifying shards"):
            self.check_checksum(s, self.open(s)[1])

    def open(self, s: int) -> tuple:
        """Shard ``s``'s table and data files (``format.shard_buffers``), or an error naming it."""
        name = self.shard_names[s]
        try:
            buffers = shard_buffers(self.fs, f"{self.root}/shards/{name}")
            return open_shard(buffers), buffers
        except FileNotFoundError as error:
            raise FileNotFoundError(f"shard {name} of the store at {self.path} is missing") from error
        except (OSError, ValueError) as error:  # pyarrow's errors on a truncated or damaged file
            raise ValueError(
                f"shard {name} of the store at {self.path} cannot be read ({error}); collect or copy the store again"
            ) from error

    def check_header(self, s: int, table) -> None:
        """Refuse shard ``s`` when its activations' storage type or width or its row count is not meta.json's."""
        acts, dtype = table.schema.field("acts").type, self.meta["dtype"]
        found = []
        if acts.list_size != self.n_models * self.d_model:
            found.append(
                f"rows of {acts.list_size} values, but meta.json says n_models {self.n_models} × d_model {self.d_model}"
            )
        if acts.value_type != STORAGE_TYPES[dtype]:
            found.append(f"{acts.value_type} values, but meta.json's dtype {dtype} is stored as {STORAGE_TYPES[dtype]}")
        if table.num_rows != self.shard_sizes[s]:
            found.append(f"{table.num_rows} rows, but meta.json lists {self.shard_sizes[s]}")
        if found:
            raise ValueError(
                f"shard {self.shard_names[s]} of the store at {self.path} holds {'; '.join(found)}: meta.json or the "
                "shard is damaged; collect or copy the store again"
            )

    def check_checksum(self, s: int, buffers) -> None:
        """Refuse shard ``s`` when its data files' sha256 is not the one meta.json records (once per shard)."""
        if s in self.checked:
            return
        if checksum(buffers) != self.checksums[s]:
            raise ValueError(
                f"shard {self.shard_names[s]} of the store at {self.path} is corrupt (its sha256 differs from "
                "meta.json's: damaged, or another shard's files under its name); collect or copy the store again"
            )
        self.checked.add(s)

    @classmethod
    def from_arrays(cls, path: str | Path, activations, token_ids=None, **options) -> "ActivationStore":
        """Write a store from activations you already have, [n, n_models, d_model], and open it
        (``options``: those of ``writer.write_arrays``)."""
        return cls(write_arrays(path, activations, token_ids, **options))

    def read_json(self, name: str, keys: tuple[str, ...] = ()) -> dict | None:
        """A JSON file of the store (``meta.json``, ``norm.json`` ...) holding each of ``keys``, or None when it
        has none (``files.parse_json``)."""
        try:
            text = self.fs.cat_file(f"{self.root}/{name}")
        except FileNotFoundError:
            return None
        return parse_json(text, f"{self.root}/{name}", keys)

    def write_json(self, name: str, value: dict) -> None:
        """Write a JSON file into the store (atomically when local)."""
        if self.remote:
            self.fs.pipe_file(f"{self.root}/{name}", json.dumps(value, indent=2).encode())
        else:
            write_json(Path(self.root) / name, value)

    def load_shard(self, s: int) -> Shard:
        """Shard ``s`` read (locally: memory-mapped) or downloaded (remote), its header and, on its first read, its
        checksum checked."""
        table, buffers = self.open(s)
        self.check_header(s, table)
        self.check_checksum(s, buffers)
        batches = table.to_batches()
        columns = {
            name: [
                batch.column(name).flatten().to_numpy().reshape(len(batch), -1)
                if name == "acts"
                else batch.column(name).to_numpy()
                for batch in batches
            ]
            for name in table.column_names
        }
        return Shard(np.cumsum([0] + [len(b) for b in batches])[:-1], columns)

    def _shard(self, s: int) -> Shard:
        if s not in self._cache:
            pending = self.pending.pop(s, None)
            self._cache[s] = pending.result() if pending else self.load_shard(s)
            while self.shard_sizes[list(self._cache)].sum() > 2 * (self.window_rows + self.shard_sizes.max()):
                self._cache.popitem(last=False)
        self._cache.move_to_end(s)
        return self._cache[s]

    def cached(self, s: int) -> bool:
        """Whether shard ``s`` is in memory or on its way."""
        return s in self._cache or s in self.pending

    def __len__(self) -> int:
        return self.meta["n_tokens"]

    def _take(self, indices, column: str) -> np.ndarray:
        """The values of one column at ``indices``, in the order asked for, read shard by shard."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        if len(ordered) and (ordered[0] < 0 or ordered[-1] >= len(self)):  # the smallest and the largest asked for
            outside = ordered[0] if ordered[0] < 0 else ordered[-1]
            raise IndexError(f"row {outside} is outside the store at {self.path}: its rows are 0 to {len(self) - 1}")
        parts = []
        for s, in_shard in groups(ordered, self.shard_starts):
            shard = self._shard(s)
            parts += [shard.columns[column][b][rows] for b, rows in groups(in_shard, shard.starts)]
        values = np.concatenate(parts)
        if np.any(np.diff(order) < 0):  # not asked for in sorted order: put the values back in the order asked
            values[order] = values.copy()
        return values

    def read(self, indices) -> torch.Tensor:
        """float32 [len(indices), n_models, d_model] in the order asked for."""
        return from_storage(self._take(indices, "acts"), self.meta["dtype"], self.n_models)

    def first_nonfinite(self, indices) -> int | None:
        """The first of rows ``indices`` holding a value that is not finite (NaN or inf), else None."""
        indices = np.asarray(indices)
        bad = ~torch.isfinite(self.read(indices)).flatten(1).all(1)
        return int(indices[bad.nonzero()[0, 0]]) if bad.any() else None

    def token_ids(self, indices) -> torch.Tensor:
        """int64 [len(indices)]: the token each row was read at."""
        return torch.from_numpy(self._take(indices, "token_id"))

    @property
    def collected_from_models(self) -> bool:
        """Whether 01 collected the store from models (its settings name them), rather than ``from_arrays``:
        what reads the models again (04's per-token KL, the spliced-in loss, the dashboard's logits) needs it."""
        return "site" in self.meta["settings"]

    def positions(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence index, position in the sequence) of each row, each int64 [len(indices)]."""
        return torch.from_numpy(self._take(indices, "seq")), torch.from_numpy(self._take(indices, "pos")).long()

    def split_range(self, split: str) -> range:
        """Rows of a split: ``train`` is the first rows, ``val`` the last ``val_fraction`` of the store."""
        n_val = int(len(self) * self.meta["val_fraction"])
        ranges = {
            "train": range(0, len(self) - n_val),
            "val": range(len(self) - n_val, len(self)),
            "all": range(len(self)),
        }
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
        for s in rng.permutation(len(self.shard_sizes)):
            first = max(self.shard_starts[s], rows.start)
            stop = min(self.shard_starts[s] + self.shard_sizes[s], rows.stop)
            if first < stop:
                window.append(np.arange(first, stop))
            if sum(map(len, window)) >= self.window_rows:
                yield rng.permutation(np.concatenate(window))
                window = []
        if window:
            yield rng.permutation(np.concatenate(window))

    def sample(self, n_rows: int, seed: int = 0, split: str = "train") -> torch.Tensor:
        """float32 [n, n_models, d_model]: up to ``n_rows`` random rows of a split, from the first shuffled
        windows of shards (so a streamed store downloads only those shards)."""
        return self.read(self.sample_rows(n_rows, seed, split))

    def sample_rows(self, n_rows: int, seed: int = 0, split: str = "train") -> np.ndarray:
        """The row indices ``sample`` reads, ascending."""
        indices, have = [], 0
        for window in self.shuffled_indices(split, seed):
            if have >= n_rows:
                break
            indices.append(window)
            have += len(window)
        return np.sort(np.concatenate(indices)[:n_rows])

    def batches(
        self,
        tokens_per_batch: int,
        seed: int = 0,
        split: str = "train",
        start_batch: int = 0,
        process: tuple[int, int] = (0, 1),
    ) -> Iterator[torch.Tensor]:
        """One pass of shuffled float32 [batch, n_models, d_model] batches (an incomplete last batch is dropped).

        ``start_batch`` skips that many batches without reading them, so a resumed run sees exactly the
        batches an uninterrupted one would. ``process=(rank, world_size)`` reads only that rank's share of
        each batch (disjoint rows; the shares of all ranks together are the batch).
        """
        for indices in self.batch_rows(tokens_per_batch, seed, split, start_batch, process):
            yield self.read(indices)

    def batch_rows(
        self,
        tokens_per_batch: int,
        seed: int = 0,
        split: str = "train",
        start_batch: int = 0,
        process: tuple[int, int] = (0, 1),
    ) -> Iterator[np.ndarray]:
        """The row indices of each batch ``batches`` reads, in its order (the shards they lie in prefetched)."""
        check_range("tokens_per_batch", tokens_per_batch, above=0, integer=True)
        windows = prefetching(self, self.shuffled_indices(split, seed), start_batch * tokens_per_batch, process)
        for number, indices in enumerate(index_batches(windows, tokens_per_batch)):
            if number >= start_batch:
                yield rank_share(indices, process)

    def locate(self, row: int) -> str:
        """Where a row lies: its shard and its row in that shard."""
        s = int(np.searchsorted(self.shard_starts, row, side="right")) - 1
        within = row - self.shard_starts[s]
        return f"row {row} of the store at {self.path} (shard {self.shard_names[s]}, row {within} in it)"

    def n_batches(self, tokens_per_batch: int, split: str = "train") -> int:
        return len(self.split_range(split)) // tokens_per_batch


def prefetching(
    store: ActivationStore, windows: Iterator[np.ndarray], first_row: int, process: tuple[int, int]
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

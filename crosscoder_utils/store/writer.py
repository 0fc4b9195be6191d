"""Writing a store: in complete shards, resumable, never mixed from two collections.

A shard is written under a temporary name and renamed when complete, so a killed collection leaves only
complete shards, and a re-run with the same settings continues after the last of them. Stores are
written on local disk; a complete one can be copied anywhere fsspec reaches, or pushed to the Hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import datasets
import fsspec
import numpy as np
import torch
from datasets.filesystems import is_remote_filesystem
from datasets.table import InMemoryTable

from ..config import STORE_DTYPES, check_range
from ..files import check_same_settings, differing_keys, read_json, take_lock, write_json
from .format import from_storage, shard_rows, shard_table, to_storage


def local_path(path: str | Path) -> Path:
    """The directory a store is written to: a local path (or file:// URL); a remote URL is refused."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if is_remote_filesystem(fs):
        raise ValueError(
            f"stores are written on local disk, not to {path}: write it locally, then copy it there "
            "or push it (hub.push_store), and read it from the URL"
        )
    return Path(root)


PROGRESS_KEYS = ("settings", "n_blocks", "n_shards", "n_tokens", "sum", "sum_norm", "identity")
"""What progress.json holds; a resume refuses one lacking any."""


class StoreWriter:
    """Writes a store in complete shards and keeps running per-model statistics.

    Shard b holds block b of the collection (``seqs_per_shard`` sequences, or ``shard_size`` rows); a
    block whose every token was excluded writes no shard. ``write_shard`` writes one shard and returns
    its statistics; ``record`` adds statistics to progress.json once every block up to ``n_blocks`` is
    written (under torchrun, ranks write their blocks side by side and rank 0 records).
    ``settings`` identify what is being written; an existing directory with other settings is refused.
    ``lock``: hold ``writer.lock`` (the writing process's id) until ``finish``, so that a second writer to
    the same store is refused while the first is alive (under torchrun only rank 0 locks).
    ``identity``: fingerprints of the inputs (``collect.input_identity``), recorded and, on a resume,
    compared: a store is never continued from changed models or data.
    """

    def __init__(
        self,
        path: str | Path,
        settings: dict,
        n_models: int,
        d_model: int,
        dtype: str,
        lock: bool = True,
        identity: dict | None = None,
    ):
        self.path, self.settings, self.dtype = local_path(path), settings, dtype
        self.n_models, self.d_model = n_models, d_model
        self.shards = self.path / "shards"
        progress_file = self.path / "progress.json"
        progress = read_json(progress_file, PROGRESS_KEYS) if progress_file.exists() else None
        if progress and progress["n_blocks"] == 0:  # a refused or killed start: nothing to keep
            if lock:
                take_lock(self.path / "writer.lock")  # unless another writer is at work there
            progress_file.unlink()
            shutil.rmtree(self.shards, ignore_errors=True)
            progress = None
        if progress:
            self.progress = progress
            check_same_settings(
                self.path,
                "an activation store",
                self.progress["settings"],
                settings,
                "pass another store_dir, or delete that one to start over",
            )
            changed = differing_keys(self.progress["identity"], identity or {})
            if changed:
                raise ValueError(
                    f"the inputs of the store at {self.path} changed since it was collected: {changed}; "
                    "restore them, or delete the store to collect again"
                )
        elif self.path.exists() and any(p.name != "writer.lock" for p in self.path.iterdir()):
            raise ValueError(f"{self.path} exists and is not an activation store; pass an empty or new store_dir")
        else:
            self.progress = {
                "settings": settings,
                "n_blocks": 0,
                "n_shards": 0,
                "n_tokens": 0,
                "sum": np.zeros((n_models, d_model)).tolist(),
                "sum_norm": [0.0] * n_models,
                "identity": identity or {},
            }
        if self.complete:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock = self.path / "writer.lock" if lock else None
        if lock:
            take_lock(self.lock)
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
        flat = check_finite(activations, seq, pos, self.dtype)
        name = f"shard_{block:05d}"
        # progress bars off for a shard's save, back on only if they were on (with HF_DATASETS_DISABLE_PROGRESS_BARS
        # set, as make demo sets it, turning them on warns)
        bars = not datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            table = shard_table(flat, token_ids, seq, pos)
            datasets.Dataset(InMemoryTable(table)).save_to_disk(str(self.shards / f".tmp_{name}"))
        finally:
            if bars:
                datasets.enable_progress_bars()
        os.replace(self.shards / f".tmp_{name}", self.shards / name)
        acts64 = activations.double().cpu()
        sums = [acts64.sum(0).flatten(), acts64.norm(dim=-1).sum(0), torch.tensor([len(activations), 1.0])]
        return torch.cat(sums)

    def record(self, stats: torch.Tensor, n_blocks: int) -> None:
        """Add the statistics of written shards to progress.json: blocks before ``n_blocks`` are done."""
        progress, nd = self.progress, self.n_models * self.d_model
        progress["sum"] = (np.array(progress["sum"]) + stats[:nd].view(self.n_models, self.d_model).numpy()).tolist()
        progress["sum_norm"] = (np.array(progress["sum_norm"]) + stats[nd:-2].numpy()).tolist()
        progress["n_tokens"] += int(stats[-2])
        progress["n_shards"] += int(stats[-1])
        progress["n_blocks"] = n_blocks
        write_json(self.path / "progress.json", progress)

    def finish(self, **meta) -> Path:
        """Write meta.json, which marks the store complete; returns the store's directory."""
        n = self.progress["n_tokens"]
        if n == 0:
            raise ValueError("no tokens were written: the data is empty, or every token was excluded")
        meta = {
            **meta,
            "n_tokens": n,
            "dtype": self.dtype,
            "n_shards": self.progress["n_shards"],
            "mean": (np.array(self.progress["sum"]) / n).tolist(),
            "mean_norm": (np.array(self.progress["sum_norm"]) / n).tolist(),
            "settings": self.settings,
            "identity": self.progress["identity"],
            "shards": shard_rows(self.shards),
        }
        write_json(self.path / "meta.json", meta)
        if self.lock:
            self.lock.unlink(missing_ok=True)
        return self.path


def check_finite(activations: torch.Tensor, seq, pos, dtype: str) -> np.ndarray:
    """The activations as ``to_storage`` gives them, once they are finite in the store dtype (checked after the
    cast: float16 overflows above 65,504); else an error naming the first bad row."""
    flat = to_storage(activations, dtype)
    stored = from_storage(flat, dtype, activations.shape[1])
    if not torch.isfinite(stored).all():
        row, model = (~torch.isfinite(stored)).any(-1).nonzero()[0]
        value = activations[row, model].abs().max().item()
        raise ValueError(
            f"non-finite activations (NaN or inf) in {dtype} at sequence {int(seq[row])} position "
            f"{int(pos[row])} (for arrays: row {int(seq[row])}), model {model.item()} "
            f"(largest |value| there before the cast: {value:.4g}); nothing of this shard was written"
            + ("; float16 holds at most 65,504: collect in float32 or bfloat16" if dtype == "float16" else "")
        )
    return flat


def arrays_settings(
    activations: torch.Tensor, token_ids: np.ndarray, shard_size: int, dtype: str, meta: dict, *positions
) -> dict:
    """What identifies a store written from arrays: their size and sha256, and every option (the shard size, the
    storage dtype, meta.json's entries): a store written before with other options is refused, not reused."""
    digest = hashlib.sha256(activations.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    for array in (token_ids, *positions):
        digest.update(np.ascontiguousarray(array).data)
    return {
        "from_arrays": len(activations),
        "shard_size": shard_size,
        "sha256": digest.hexdigest(),
        "dtype": dtype,
        "meta": meta,
    }


def write_arrays(
    path: str | Path,
    activations,
    token_ids=None,
    shard_size: int = 65536,
    val_fraction: float = 0.05,
    dtype: str = "float32",
    positions=None,
    **meta,
) -> Path:
    """Write a store from activations you already have: [n, n_models, d_model] (tensor or array), with
    optional ``token_ids`` [n] and ``positions`` (sequence index [n], position in the sequence [n]; else each
    row is a sequence of its own); ``meta`` adds or overrides entries of meta.json (e.g. ``models``). A store
    written before from the same arrays (their sha256) and options is reused; one from other arrays or options is
    refused."""
    activations = torch.as_tensor(activations)
    check_range("shard_size", shard_size, above=0)
    check_range("val_fraction", val_fraction, at_least=0, below=1)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(STORE_DTYPES)}")
    if activations.ndim != 3 or len(activations) == 0:
        raise ValueError(f"activations must be [n_tokens > 0, n_models, d_model], got {tuple(activations.shape)}")
    n, n_models, d_model = activations.shape
    token_ids = np.full(n, -1) if token_ids is None else np.asarray(token_ids)
    if len(token_ids) != n:
        raise ValueError(f"token_ids has {len(token_ids)} entries for {n} activation rows")
    meta = {
        "models": [f"model_{m}" for m in range(n_models)],
        "site": None,
        "layer": None,
        **meta,
        "n_models": n_models,
        "d_model": d_model,
        "val_fraction": val_fraction,
    }
    seq, pos = (np.arange(n), np.zeros(n, dtype=np.int64)) if positions is None else map(np.asarray, positions)
    if len(seq) != n or len(pos) != n:
        raise ValueError(f"positions hold {len(seq)} sequence indices and {len(pos)} positions for {n} rows")
    for start in range(0, n, shard_size):  # every row checked before anything is written
        part = slice(start, start + shard_size)
        check_finite(activations[part], seq[part], pos[part], dtype)
    settings = arrays_settings(
        activations, token_ids, shard_size, dtype, meta, *([] if positions is None else [seq, pos])
    )
    writer = StoreWriter(path, settings, n_models, d_model, dtype)
    if writer.complete:  # written before from the same arrays: reused
        return writer.path
    for block in range(writer.progress["n_blocks"], -(-n // shard_size)):
        part = slice(block * shard_size, (block + 1) * shard_size)
        stats = writer.write_shard(activations[part], token_ids[part], seq[part], pos[part], block)
        writer.record(stats, n_blocks=block + 1)
    return writer.finish(**meta)

"""The store's format on disk (or wherever fsspec reaches).

Layout of a store directory::

    meta.json                written last: its presence means the store is complete; lists the shards
                             ([name, n_rows, sha256 of its data files] each)
    norm.json                the norm scale factors (02_normalize)
    progress.json            collection progress (settings, blocks done, statistics so far), for resuming
    shards/shard_00000/ ...  HF datasets (``save_to_disk``), one row per token; shard b holds block b:
                             acts      flat fixed-length list of n_models * d_model values
                             token_id  int64, seq int64 (sequence index), pos int32 (position in it)

datasets has no bfloat16: bfloat16 activations are kept bit-exact as int16.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import torch
from datasets.filesystems import is_remote_filesystem
from einops import rearrange

STORAGE_TYPES = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.int16()}
"""The arrow type each activation dtype is stored as."""


def to_storage(activations: torch.Tensor, dtype: str) -> np.ndarray:
    """[n, n_models, d_model] float -> [n, n_models * d_model] numpy in the storage dtype."""
    if dtype == "bfloat16":
        stored = activations.to(torch.bfloat16).view(torch.int16)
    else:
        stored = activations.to(getattr(torch, dtype))
    return rearrange(stored, "n model d -> n (model d)").cpu().numpy()


def from_storage(flat: np.ndarray, dtype: str, n_models: int) -> torch.Tensor:
    """[n, n_models * d_model] stored values -> float32 [n, n_models, d_model]."""
    values = torch.from_numpy(flat)
    values = values.view(torch.bfloat16) if dtype == "bfloat16" else values
    return rearrange(values.float(), "n (model d) -> n model d", model=n_models)


def shard_table(flat: np.ndarray, token_ids: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> pa.Table:
    """The columns of one shard: activations as ``to_storage`` gives them; token_ids, seq, pos [n]."""
    return pa.table(
        {
            "acts": pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]),
            "token_id": pa.array(np.asarray(token_ids, dtype=np.int64)),
            "seq": pa.array(np.asarray(seq, dtype=np.int64)),
            "pos": pa.array(np.asarray(pos, dtype=np.int32)),
        }
    )


def data_files(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    """The paths of the data files of a shard written by ``save_to_disk``."""
    return [f"{directory}/{f['filename']}" for f in json.loads(fs.cat_file(f"{directory}/state.json"))["_data_files"]]


def shard_buffers(fs: fsspec.AbstractFileSystem, directory: str) -> list[pa.Buffer]:
    """The data files of a shard written by ``save_to_disk``: memory-mapped when local, downloaded when remote."""
    files = data_files(fs, directory)
    if is_remote_filesystem(fs):
        return [pa.py_buffer(fs.cat_file(f)) for f in files]
    return [pa.memory_map(f).read_buffer() for f in files]


def open_shard(buffers: list[pa.Buffer]) -> pa.Table:
    """The table of a shard's data files (``shard_buffers``), zero-copy."""
    return pa.concat_tables([pa.ipc.open_stream(buffer).read_all() for buffer in buffers])


def checksum(buffers: list[pa.Buffer]) -> str:
    """sha256 over a shard's data files (``shard_buffers``), in order."""
    digest = hashlib.sha256()
    for buffer in buffers:
        digest.update(memoryview(buffer))
    return digest.hexdigest()


def shard_rows(directory: Path) -> list[list]:
    """[[name, n_rows, sha256], ...] of the complete shards under a local ``directory``, in order."""
    fs = fsspec.filesystem("file")
    shards = [(shard.name, shard_buffers(fs, str(shard))) for shard in sorted(directory.glob("shard_*"))]
    return [[name, open_shard(buffers).num_rows, checksum(buffers)] for name, buffers in shards]

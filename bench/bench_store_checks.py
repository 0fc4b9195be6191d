"""What the store's own checks cost (``ActivationStore``): the header check of every shard on opening, and the
sha256 of each shard's data files on its first read, measured side by side in one process on one store.

1. Opening: ``ActivationStore(path)`` (every shard's header read from its memory-mapped files) against reading
   meta.json alone.
2. A training pass (``batches``, shuffled, 4096 rows a batch, the rows turned into float32 as training reads them)
   with each shard's checksum checked on its first read, against the same pass on a store whose shards are marked
   checked already. Each pass opens the store again; the files are in the page cache after the first pass (a pass
   before the timed ones warms it), so the difference is the hashing itself.

Run: python bench/bench_store_checks.py [n_rows] [d_model]
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from crosscoder_utils import ActivationStore


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def one_pass(store: ActivationStore) -> int:
    return sum(len(batch) for batch in store.batches(4096))


def main(n_rows: int = 400_000, d_model: int = 256) -> None:
    with tempfile.TemporaryDirectory() as root:
        x = torch.randn(n_rows, 2, d_model, generator=torch.Generator().manual_seed(0))
        store = ActivationStore.from_arrays(f"{root}/store", x, np.arange(n_rows) % 1000, shard_size=10_000)
        del x
        size = sum(f.stat().st_size for f in Path(root, "store/shards").rglob("*.arrow"))
        one_pass(ActivationStore(store.path))  # the page cache warmed
        _, opened = timed(lambda: ActivationStore(store.path))
        _, meta = timed(lambda: store.read_json("meta.json"))
        checked = []
        for _ in range(3):  # alternated, so that drift in the machine's speed falls on both
            fresh, marked = ActivationStore(store.path), ActivationStore(store.path)
            marked.checked = set(range(len(marked.shard_names)))
            checked.append((timed(lambda: one_pass(fresh))[1], timed(lambda: one_pass(marked))[1]))  # noqa: B023
        print(
            f"{n_rows:,} rows × 2 models × {d_model} float32 in {len(store.shard_names)} shards ({size / 1e9:.2f} GB)"
        )
        print(f"opening, every shard's header: {opened * 1e3:.1f} ms (meta.json alone {meta * 1e3:.1f} ms)")
        for with_checks, without in checked:
            print(
                f"a pass: {with_checks:.2f} s with the first-read checksums, {without:.2f} s without "
                f"(ratio {with_checks / without:.2f})"
            )


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

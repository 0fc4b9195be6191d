"""Training straight from the models: ``ModelSource`` serves the training rows of the store a
``CollectConfig`` would collect, computed by the models as training asks for them and never written, for
when the disk cannot hold the activations. ``train_crosscoder`` reads it as it reads an ``ActivationStore``
(``n_batches``, ``batches``, ``sample``, ``split_range``).

Rows are numbered as in that store: the kept tokens of the dataset's documents in order, cut at
``n_tokens``; the first rows are training rows and the last ``val_fraction`` are held out, written by
``write_heldout`` as a small store beside the run, which is what 04 reads.
"""

from __future__ import annotations

import contextlib
import math
import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import distributed
from .collect import (
    ActivationBatch,
    TracedPair,
    documents,
    input_identity,
    iter_activations,
    keep_mask,
    load_pair,
    preflight,
    store_meta,
)
from .config import CollectConfig, check_range
from .models import ModelPair
from .normalize import factors_from_norms, save_norm_factors
from .store import ActivationStore, StoreWriter

FIRST_FILL = 32_768
"""At most this many first training rows estimate the norm factors (and data_init draws from at least as many)."""


class Chunk(NamedTuple):
    """Consecutive rows of one process's share: activations [n, n_models, d_model] and each row's token,
    document (sequence number) and position."""

    activations: torch.Tensor
    token_ids: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor


def _cat(parts: list[ActivationBatch]) -> Chunk:
    return Chunk(*(torch.cat(column) for column in zip(*parts)))


class ModelSource:
    """The training rows of the store ``cfg`` would collect, from the models, shuffled in a buffer.

    Each process (rank of ``world`` under torchrun) reads its own documents: the blocks of
    ``seqs_per_shard`` sequences round robin, as collection shares them. Its rows are cut into chunks of
    ``buffer_tokens / 2``; in each pass every chunk is split at random into an early and a late half, and
    phase k serves the late half of chunk k − 1 with the early half of chunk k in random order. The buffer
    so holds two chunks, refills one chunk when one has been served, mixes rows across ``buffer_tokens``,
    and serves every row exactly once a pass (a pass is as many rows as the process with the fewest has).
    A pass's order depends only on the seed, so a resumed run collects the two chunks its next batch needs
    again and continues exactly. The next chunk is collected in a background thread while the crosscoder
    trains on the current ones (about 2.5 × ``buffer_tokens`` rows in memory)."""

    def __init__(self, cfg: CollectConfig, buffer_tokens: int = 2**18, pair: ModelPair | None = None):
        check_range("buffer_tokens", buffer_tokens, above=1)
        self.cfg, self.chunk_rows = cfg, buffer_tokens // 2
        device = distributed.init_from_env(cfg.device)
        pair = pair or load_pair(cfg, device)
        self.pair, self.traced = pair, TracedPair(pair, cfg.site, cfg.layer, cfg.padding_side)
        self.d_model, self.n_models = preflight(self.traced, cfg), 2
        self.inputs = input_identity(cfg, pair)
        per_block = self._rows_per_block()
        self.block_start = np.concatenate([[0], np.cumsum(per_block)])
        n_rows = int(self.block_start[-1])
        self.n_train = n_rows - int(n_rows * cfg.val_fraction)
        self.meta = {**store_meta(cfg, pair, self.d_model), "n_tokens": n_rows, "val_fraction": cfg.val_fraction}
        self._head: Chunk | None = None

    def _rows_per_block(self) -> list[int]:
        """Kept tokens of each block of ``seqs_per_shard`` documents, from the tokens alone (no forward), the
        block that reaches ``n_tokens`` cut there."""
        cfg, tokenizer = self.cfg, self.pair.tokenizer
        counts, total = [], 0
        for i, ids in enumerate(documents(cfg, tokenizer)):
            if total >= cfg.n_tokens:
                break
            ids = torch.tensor([ids])
            kept = int(
                keep_mask(
                    ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], cfg, tokenizer.bos_token_id
                ).sum()
            )
            kept = min(kept, cfg.n_tokens - total)
            if i % cfg.seqs_per_shard == 0:
                counts.append(0)
            counts[-1] += kept
            total += kept
        return counts

    def split_range(self, split: str) -> range:
        """Rows of a split, as the store would number them: ``train`` first, ``val`` the last ``val_fraction``."""
        return {"train": range(self.n_train), "val": range(self.n_train, int(self.block_start[-1]))}[split]

    def _blocks(self, lo: int, hi: int, process: tuple[int, int]) -> tuple[list[int], np.ndarray]:
        """This process's blocks holding rows of [lo, hi), and the row offset of each in its share."""
        rank, world = process
        overlap = lambda b: max(0, min(hi, self.block_start[b + 1]) - max(lo, self.block_start[b]))
        mine = [b for b in range(rank, len(self.block_start) - 1, world) if overlap(b)]
        return mine, np.concatenate([[0], np.cumsum([overlap(b) for b in mine])]).astype(int)

    def share(self, process: tuple[int, int]) -> int:
        """Rows a pass serves to each process: the training rows of the process with the fewest."""
        world = process[1]
        rows = min(int(self._blocks(0, self.n_train, (r, world))[1][-1]) for r in range(world))
        if rows == 0:
            raise ValueError(
                f"with {world} processes some read no training rows: the documents make "
                f"{len(self.block_start) - 1} blocks of seqs_per_shard={self.cfg.seqs_per_shard}, shared round robin; "
                "lower seqs_per_shard or raise n_tokens"
            )
        return rows

    def _stream(self, lo: int, hi: int, process: tuple[int, int], skip: int = 0) -> Iterator[ActivationBatch]:
        """This process's rows among rows [lo, hi) in order, from its ``skip``-th, as collected batches."""
        mine, offsets = self._blocks(lo, hi, process)
        first = int(np.searchsorted(offsets, skip, side="right")) - 1
        if first >= len(mine):
            return
        sps, rank = self.cfg.seqs_per_shard, process[0]
        seen: dict[int, int] = {}
        to_skip = skip - offsets[first]
        for batch in iter_activations(self.traced, self.cfg, (mine[first] - rank) * sps, process):
            if not len(batch.seq):
                continue
            block = int(batch.seq[0]) // sps
            if block > mine[-1]:
                return
            rows = self.block_start[block] + seen.get(block, 0) + torch.arange(len(batch.seq))
            seen[block] = seen.get(block, 0) + len(batch.seq)
            keep = (rows >= lo) & (rows < hi)
            batch = ActivationBatch(*(column[keep] for column in batch))
            if to_skip:
                cut = min(to_skip, len(batch.seq))
                batch, to_skip = ActivationBatch(*(column[cut:] for column in batch)), to_skip - cut
            if len(batch.seq):
                yield batch

    def _chunks(self, process: tuple[int, int], first: int, n_rows: int) -> Iterator[tuple[int, Chunk]]:
        """Chunks ``first``, ``first`` + 1, ... of this process's first ``n_rows`` training rows."""
        size = self.chunk_rows
        parts, have, number = [], 0, first
        for batch in self._stream(0, self.n_train, process, skip=first * size):
            parts.append(batch)
            have += len(batch.seq)
            while have >= size or (have and number * size + have >= n_rows):
                rows = _cat(parts)
                take = min(size, n_rows - number * size)
                yield number, Chunk(*(column[:take] for column in rows))
                parts, have, number = [ActivationBatch(*(column[take:] for column in rows))], have - take, number + 1
                if number * size >= n_rows:
                    return

    def _phase(self, seed: int, number: int, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(chunk, row in chunk) of the rows phase ``number`` serves, in order: the late half of chunk
        number − 1 and the early half of chunk ``number``, shuffled."""
        halves = lambda c: np.split(np.random.default_rng([seed, c, 0]).permutation(sizes[c]), [sizes[c] // 2])
        parts = []
        if number > 0:
            parts.append((np.full(sizes[number - 1] - sizes[number - 1] // 2, number - 1), halves(number - 1)[1]))
        if number < len(sizes):
            parts.append((np.full(sizes[number] // 2, number), halves(number)[0]))
        chunks, rows = (np.concatenate(column) for column in zip(*parts))
        order = np.random.default_rng([seed, number, 1]).permutation(len(rows))
        return chunks[order], rows[order]

    def served(
        self, tokens_per_batch: int, seed: int = 0, start_batch: int = 0, process: tuple[int, int] = (0, 1)
    ) -> Iterator[Chunk]:
        """One pass of this process's batches of ``tokens_per_batch / world`` rows, with the token, document
        and position of each row; ``start_batch`` continues a pass exactly where it stopped."""
        per = tokens_per_batch // process[1]
        n_rows = self.share(process) // per * per
        sizes = [min(self.chunk_rows, n_rows - c * self.chunk_rows) for c in range(math.ceil(n_rows / self.chunk_rows))]
        phase_rows = np.array([sizes[0] // 2] + [a - a // 2 + b // 2 for a, b in zip(sizes, sizes[1:] + [0])])
        phase_ends = np.cumsum(phase_rows)
        start = start_batch * per
        phase = int(np.searchsorted(phase_ends, start, side="right"))
        if start >= n_rows:
            return
        produced: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def offer(item) -> bool:
            while not stop.is_set():
                try:
                    produced.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():  # the forwards, in the background (on CUDA, on a stream of their own)
            device = self.traced.device
            stream = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
            try:
                with stream:
                    for item in self._chunks(process, max(phase - 1, 0), n_rows):
                        if not offer(item):
                            return
            except BaseException as error:  # raised again where the batches are read
                offer((None, error))

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        loaded: dict[int, Chunk] = {}
        pending_chunks, pending_rows = np.empty(0, dtype=int), np.empty(0, dtype=int)
        skip = start - int(phase_ends[phase - 1]) if phase else start
        try:
            for number in range(phase, len(sizes) + 1):
                chunks, rows = self._phase(seed, number, sizes)
                pending_chunks = np.concatenate([pending_chunks, chunks[skip:]])
                pending_rows = np.concatenate([pending_rows, rows[skip:]])
                skip = 0
                while len(pending_rows) >= per:
                    batch_chunks, batch_rows = pending_chunks[:per], pending_rows[:per]
                    pending_chunks, pending_rows = pending_chunks[per:], pending_rows[per:]
                    needed = [int(c) for c in np.unique(batch_chunks)]
                    while not set(needed) <= set(loaded):
                        got, chunk = produced.get()
                        if got is None:
                            raise chunk
                        loaded[got] = chunk
                    out = [torch.empty((per, *column.shape[1:]), dtype=column.dtype) for column in loaded[needed[0]]]
                    for c in needed:
                        where = torch.from_numpy(np.nonzero(batch_chunks == c)[0])
                        index = torch.from_numpy(batch_rows[batch_chunks == c])
                        for target, column in zip(out, loaded[c]):
                            target[where] = column[index]
                    yield Chunk(*out)
                    keep = min(number - 1, int(pending_chunks.min())) if len(pending_chunks) else number - 1
                    loaded = {c: chunk for c, chunk in loaded.items() if c >= keep}
        finally:  # one thread traces the models at a time (nnsight): wait for the chunk in progress
            stop.set()
            producer.join()

    def batches(
        self, tokens_per_batch: int, seed: int = 0, start_batch: int = 0, process: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        """One pass of float32 [tokens_per_batch / world, n_models, d_model] batches, as ``ActivationStore.batches``."""
        for chunk in self.served(tokens_per_batch, seed, start_batch, process):
            yield chunk.activations.float()

    def n_batches(self, tokens_per_batch: int) -> int:
        world = distributed.world_size()
        return self.share((0, world)) // (tokens_per_batch // world)

    def head(self, n_rows: int) -> torch.Tensor:
        """float32 [n, n_models, d_model]: the first ``n_rows`` training rows in store order (every process the
        same rows)."""
        n_rows = min(n_rows, self.n_train)
        if self._head is None or len(self._head.seq) < n_rows:
            self._head = _cat([chunk for _, chunk in self._chunks((0, 1), 0, n_rows)])
        return self._head.activations[:n_rows].float()

    def sample(self, n_rows: int, seed: int = 0) -> torch.Tensor:
        """Up to ``n_rows`` rows drawn at random from the first max(n_rows, FIRST_FILL) training rows."""
        rows = self.head(max(n_rows, FIRST_FILL))
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_rows]]

    def norm_factors(self) -> torch.Tensor:
        """The factors that scale each model's mean activation norm to sqrt(d_model) on the first fill: the
        first buffer_tokens / 2 training rows, at most FIRST_FILL."""
        mean_norm = self.head(min(self.chunk_rows, FIRST_FILL)).norm(dim=-1).mean(0)
        return factors_from_norms(
            mean_norm, self.d_model, f"the norm factors of the first fill of {self.cfg.base_model}"
        )

    def identity(self) -> dict:
        """What a run trained from this source records, to refuse a resume from other data or models."""
        return {"collect": self.cfg.settings(), "inputs": self.inputs, "buffer_tokens": 2 * self.chunk_rows}

    def write_heldout(self, path: str | Path, factors: torch.Tensor) -> ActivationStore:
        """The held-out rows as a store whose every row is ``val`` (04 reads it as it reads a store's val split),
        with ``factors`` as its norm.json; one already complete at ``path`` is read back."""
        path = Path(path)
        if (path / "meta.json").exists():
            return ActivationStore(path)
        partial = path.with_name(path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        cfg = self.cfg
        writer = StoreWriter(partial, cfg.settings(), self.n_models, self.d_model, cfg.dtype, identity=self.inputs)
        val = self.split_range("val")
        if not len(val):
            raise ValueError("val_fraction is 0: a run trained from the models needs held-out rows for 04")
        for number, batch in enumerate(self._stream(val.start, val.stop, (0, 1))):
            writer.record(writer.write_shard(*batch, block=number), n_blocks=number + 1)
        writer.finish(**{**self.meta, "val_fraction": 1.0})
        partial.rename(path)
        store = ActivationStore(path)
        save_norm_factors(store, factors, n_batches=0)
        return store

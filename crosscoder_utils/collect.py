"""Paired activations: both models traced with nnsight on the same token ids, written to a store
(``collect_activations``) or served on the fly to training (``iter_activations`` through ``source.ModelSource``)."""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import torch
from nnsight import NNsight

from . import distributed
from .config import CollectConfig
from .files import differing_keys, fingerprint, read_json
from .models import PROBE_TEXT, ModelPair, load_model_pair, local_or_hub, resolve_site
from .notebook import progress
from .store import ActivationStore, StoreWriter, local_path


class ActivationBatch(NamedTuple):
    """The kept tokens of one forward batch."""

    activations: torch.Tensor
    """float [n, n_models, d_model], model 0 the base."""
    token_ids: torch.Tensor
    """int64 [n]"""
    seq: torch.Tensor
    """int64 [n]: index of the sequence (document) each token came from."""
    pos: torch.Tensor
    """int64 [n]: position of the token in its sequence."""


def load_texts(dataset: str | list, split: str, text_column: str, tokenizer) -> Iterable[str]:
    """Texts from a list, a local dataset directory or data files, or a Hub dataset (streamed).

    A column of chat messages (lists of {role, content}) is rendered with the tokenizer's chat template.
    """
    if isinstance(dataset, (list, tuple)):
        return list(dataset)
    path = Path(local_or_hub(dataset, "dataset"))
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        saved = path / split if (path / "dataset_dict.json").exists() else path
        if (saved / "state.json").exists() and not read_json(saved / "state.json")["_data_files"]:
            return []  # saved with no rows: datasets cannot load it back (an IndexError inside it)
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"dataset {dataset!r} has no split {split!r}; its splits are {list(data)}")
            data = data[split]
    else:
        data = datasets.load_dataset(str(dataset), split=split, streaming=not path.exists())
    if text_column not in (data.column_names or [text_column]):
        raise ValueError(f"dataset {dataset!r} has no column {text_column!r}; its columns are {data.column_names}")
    column = (row[text_column] for row in data)
    first = next(column, None)
    if first is None:
        return []
    column = itertools.chain([first], column)
    if isinstance(first, list):
        if tokenizer.chat_template is None:
            raise ValueError(f"column {text_column!r} holds chat messages but the tokenizer has no chat template")
        return (tokenizer.apply_chat_template(messages, tokenize=False) for messages in column)
    return column


def documents(cfg: CollectConfig, tokenizer) -> Iterator[list[int]]:
    """The token ids of each document of ``cfg``'s dataset, as collection reads them (``tokenize``)."""
    return tokenize(load_texts(cfg.dataset, cfg.split, cfg.text_column, tokenizer), tokenizer, cfg.seq_len)


def stored_documents(
    store: ActivationStore, tokenizer, rows: np.ndarray, extra: int = 0
) -> tuple[list[list[int]], int]:
    """The documents that store ``rows`` come from (and the ``extra`` documents after them), tokenised again from
    the store's dataset as 01 tokenised them, with the first one's number. They are checked against the
    store's token ids at ``rows`` first: a dataset that changed since collection would run the models on other
    tokens than the store holds, and the per-token KL would rank the latents against the wrong text."""
    cfg = collection_settings(store, "tokenising its documents again")
    seq, pos = (t.numpy() for t in store.positions(rows))
    first, last = int(seq.min()), int(seq.max())
    sequences = list(itertools.islice(documents(cfg, tokenizer), first, last + 1 + extra))
    stored_docs = sequences[: last + 1 - first]  # a dataset that lost documents yields fewer
    lengths = np.array([len(ids) for ids in stored_docs] + [0] * (last + 1 - first - len(stored_docs)))
    inside = pos < lengths[seq - first]
    flat = np.array([t for ids in stored_docs for t in ids] + [-1], dtype=np.int64)  # -1: past a document's end
    now = flat[np.where(inside, np.concatenate([[0], np.cumsum(lengths)])[seq - first] + pos, len(flat) - 1)]
    stored = store.token_ids(rows).numpy()
    wrong = np.flatnonzero(now != stored)
    if len(wrong):
        at = wrong[0]
        name = cfg.dataset if isinstance(cfg.dataset, str) else "<list of texts>"
        found = f"token {now[at]}" if inside[at] else "no token (the document is shorter now)"
        raise ValueError(
            f"dataset {name!r} (split {cfg.split!r}) tokenised again does not match the store at {store.path}: "
            f"{len(wrong)} of {len(rows)} rows differ, the first at row {rows[at]} (document {seq[at]}, position "
            f"{pos[at]}: stored token {stored[at]}, now {found}); the dataset or tokenizer changed since "
            "collection: restore them, or collect a new store"
        )
    return sequences, first


def collection_settings(store: ActivationStore, what: str) -> CollectConfig:
    """The settings a store was collected from models with (01); refused, saying ``what`` needs them, for a
    store written from arrays."""
    if not store.collected_from_models:
        raise ValueError(f"{what} needs a store collected from models (not from_arrays)")
    return CollectConfig.from_dict(store.meta["settings"])


def load_pair(cfg: CollectConfig, device: str | None = None) -> ModelPair:
    """The models ``cfg`` names, loaded as collection loads them (dtype, remote code, each model's revision)
    on ``device`` (None: ``cfg.device``)."""
    return load_model_pair(
        cfg.base_model,
        cfg.finetuned_model,
        cfg.model_dtype,
        cfg.device if device is None else device,
        cfg.trust_remote_code,
        cfg.base_revision,
        cfg.finetuned_revision,
    )


def store_models(store: ActivationStore, device: str = "auto", what: str = "reading the models") -> ModelPair:
    """The models a store was collected from, loaded as 01 loaded them (``load_pair``) on ``device``."""
    return load_pair(collection_settings(store, what), device)


def tokenize(texts: Iterable[str], tokenizer, seq_len: int | None) -> Iterator[list[int]]:
    """Token ids of each non-empty text, BOS first where the tokenizer has one, truncated to seq_len (None: whole)."""
    bos = tokenizer.bos_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        ids = ids[:seq_len]
        if len(ids) > (bos is not None):
            yield ids


class TracedPair:
    """The models of a pair wrapped for nnsight at one site, with how their batches are padded: the one
    place that traces them (collection, the preflight checks and the spliced-in loss)."""

    def __init__(self, pair: ModelPair, site: str, layer: int, padding_side: str = "right"):
        self.pair, self.padding_side = pair, padding_side
        self.models = [NNsight(model) for model in pair.models]
        self.sites = [resolve_site(model, site, layer) for model in pair.models]
        tokenizer = pair.tokenizer
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.device = pair.base.device
        self.limits = [
            (name, model.get_input_embeddings().num_embeddings, getattr(model.config, "max_position_embeddings", None))
            for name, model in zip(pair.names, pair.models)
        ]
        """Each model's name, embedding rows and positions: ``pad`` refuses token ids and lengths past them."""

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and position_ids [batch, max_len] on the models' device; positions
        count real tokens only."""
        length, top = max(map(len, sequences)), max(map(max, sequences))
        for name, n_embeddings, n_positions in self.limits:  # an IndexError deep in the forward otherwise
            if top >= n_embeddings:
                raise ValueError(
                    f"token id {top} is past {name!r}'s embedding ({n_embeddings} rows): the tokenizer (the base's) "
                    "is not this model's; give both models the same vocabulary"
                )
            if n_positions and length > n_positions:
                raise ValueError(
                    f"a sequence of {length} tokens is longer than {name!r}'s {n_positions} positions "
                    f"(max_position_embeddings): lower seq_len to {n_positions} or less"
                )
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if self.padding_side == "left" else slice(0, len(seq))
            ids[row, span] = torch.tensor(seq)
            mask[row, span] = 1
        return ids.to(self.device), mask.to(self.device), ((mask.cumsum(-1) - 1).clamp(min=0)).to(self.device)

    def _envoy(self, m: int):
        envoy = self.models[m]
        for part in self.sites[m].module_path.split("."):
            envoy = getattr(envoy, part)
        return envoy

    def site_activation(self, m: int, ids, mask, pos) -> torch.Tensor:
        """[batch, seq, d] activation of model ``m`` at the site; the forward stops right after it."""
        envoy = self._envoy(m)
        with torch.inference_mode():
            with self.models[m].trace(input_ids=ids, attention_mask=mask, position_ids=pos) as tracer:
                value = envoy.input if self.sites[m].read_input else envoy.output
                if isinstance(value, tuple):
                    value = value[0]
                value = value.save()
                tracer.stop()
        return value

    def activations(self, ids, mask, pos) -> torch.Tensor:
        """[batch, seq, n_models, d]: every model's activation at the site."""
        return torch.stack([self.site_activation(m, ids, mask, pos) for m in range(len(self.models))], dim=2)

    def logits(self, m: int, ids, mask, pos, replacement: torch.Tensor | None = None) -> torch.Tensor:
        """[batch, seq, vocab] logits of model ``m``, with its site activation replaced by ``replacement``
        [batch, seq, d] when given."""
        envoy, model = self._envoy(m), self.models[m]
        with torch.inference_mode():
            with model.trace(input_ids=ids, attention_mask=mask, position_ids=pos):
                if replacement is not None and self.sites[m].read_input:
                    envoy.input = replacement
                elif replacement is not None:
                    original = envoy.output
                    envoy.output = (replacement,) + tuple(original[1:]) if isinstance(original, tuple) else replacement
                logits = model.output.logits.save()
        return logits


def keep_mask(input_ids, attention_mask, position_ids, cfg: CollectConfig, bos_id) -> torch.Tensor:
    """bool [batch, seq]: real tokens that are not excluded."""
    keep = attention_mask.bool() & (position_ids >= cfg.exclude_first_n)
    if cfg.exclude_bos and bos_id is not None:
        keep &= input_ids != bos_id
    for token in cfg.exclude_token_ids:
        keep &= input_ids != token
    return keep


def iter_activations(
    traced: TracedPair, cfg: CollectConfig, skip_sequences: int = 0, process: tuple[int, int] = (0, 1)
) -> Iterator[ActivationBatch]:
    """Kept tokens of each batch of ``seqs_per_batch`` sequences, every model on the same ids.

    ``process=(rank, world_size)``: only the blocks of ``seqs_per_shard`` sequences (counted from
    ``skip_sequences``) that fall to this rank, round robin; the sequence numbers stay global."""
    rank, world = process
    tokenizer = traced.pair.tokenizer
    sequences = itertools.islice(enumerate(documents(cfg, tokenizer)), skip_sequences, None)
    mine = ((i, ids) for i, ids in sequences if (i - skip_sequences) // cfg.seqs_per_shard % world == rank)
    while batch := list(itertools.islice(mine, cfg.seqs_per_batch)):
        numbers, batch = zip(*batch)
        ids, mask, pos = traced.pad(list(batch))
        keep = keep_mask(ids, mask, pos, cfg, tokenizer.bos_token_id)
        seq = torch.tensor(numbers, device=ids.device)[:, None].expand_as(ids)
        acts = traced.activations(ids, mask, pos)
        yield ActivationBatch(acts[keep].cpu(), ids[keep].cpu(), seq[keep].cpu(), pos[keep].cpu())


def input_identity(cfg: CollectConfig, pair: ModelPair) -> dict:
    """What a store records of its inputs, to notice one changed at the same path: for each model and the
    dataset, the size and sha256 of each file when local, else the Hub commit the model resolved to (and
    the dataset's name and split, all that can be known of a streamed Hub dataset offline)."""
    identity = {}
    for role, name, model in zip(("base_model", "finetuned_model"), (cfg.base_model, cfg.finetuned_model), pair.models):
        source = local_or_hub(name)
        identity[role] = (
            fingerprint(source) if isinstance(source, Path) else {"commit": getattr(model.config, "_commit_hash", None)}
        )
    if isinstance(cfg.dataset, str):
        source = local_or_hub(cfg.dataset, "dataset")
        identity["dataset"] = fingerprint(source) if isinstance(source, Path) else {"id": source, "split": cfg.split}
    else:
        identity["dataset"] = {"texts": hashlib.sha256("\0".join(cfg.dataset).encode()).hexdigest()}
    return identity


def check_inputs(store: ActivationStore, pair: ModelPair | None = None) -> None:
    """Refuse a store whose models or dataset changed since it was collected (``input_identity``), naming
    what changed: what is computed from the models again (04's per-token KL, the spliced-in loss) would
    otherwise mix two versions."""
    cfg = collection_settings(store, "checking its inputs")
    pair = pair or load_pair(cfg)
    changed = differing_keys(store.meta["identity"], input_identity(cfg, pair))
    if changed:
        raise ValueError(
            f"the inputs of the store at {store.path} changed since it was collected: {changed}; restore them, "
            "or collect a new store"
        )


def preflight(traced: TracedPair, cfg: CollectConfig) -> int:
    """Check the pair, the site and the data before any compute is spent. Returns d_model.

    Refuses a pair whose widths at the site differ, data with no tokens, and exclusions that leave no
    token of the first batch (an unknown site or layer was already refused when the pair was traced)."""
    pair = traced.pair
    first = list(itertools.islice(documents(cfg, pair.tokenizer), cfg.seqs_per_batch))
    if not first:
        name = cfg.dataset if isinstance(cfg.dataset, str) else "list"
        raise ValueError(
            f"dataset {name} yields no tokens (split {cfg.split!r}, column {cfg.text_column!r}, seq_len {cfg.seq_len}"
            + ("; a sequence of 1 token holds only BOS)" if cfg.seq_len == 1 else ")")
        )
    if not keep_mask(*traced.pad(first), cfg, pair.tokenizer.bos_token_id).any():
        raise ValueError(
            f"every token of the first {len(first)} sequences is excluded (seq_len {cfg.seq_len}, exclude_bos "
            f"{cfg.exclude_bos}, exclude_first_n {cfg.exclude_first_n}, exclude_token_ids {cfg.exclude_token_ids}): "
            "nothing would be stored; relax the exclusions or raise seq_len"
        )
    probe = traced.pad([pair.tokenizer(PROBE_TEXT)["input_ids"]])
    widths = [traced.site_activation(m, *probe).shape[-1] for m in range(len(pair.models))]
    if widths[0] != widths[1]:
        raise ValueError(
            f"{pair.names[0]!r} has width {widths[0]} at {cfg.site} layer {cfg.layer} but "
            f"{pair.names[1]!r} has {widths[1]}; both must be equal"
        )
    return widths[0]


def collect_activations(cfg: CollectConfig, store_dir: str | Path, pair: ModelPair | None = None) -> ActivationStore:
    """Collect ``cfg.n_tokens`` paired activations into ``store_dir``, resuming an interrupted run.

    A store already complete with the same settings is returned as it is; one with other settings is
    refused. ``pair`` may be passed to reuse loaded models (it must be the models ``cfg`` names).

    Under torchrun (N processes, one per GPU) each rank takes every N-th block of ``seqs_per_shard``
    sequences and writes its shards into the same store; after each round of N blocks the token counts
    are shared, the block that crosses ``n_tokens`` is cut there, and rank 0 records the progress and
    writes the meta. The store equals a single process's, and a run resumes with any number of processes.
    """
    store_dir = local_path(store_dir)  # before any model is loaded
    device = distributed.init_from_env(cfg.device)
    rank, world = distributed.rank(), distributed.world_size()
    settings = cfg.settings()
    pair = pair or load_pair(cfg, device)
    traced = TracedPair(pair, cfg.site, cfg.layer, cfg.padding_side)
    d_model = preflight(traced, cfg)
    identity = input_identity(cfg, pair)
    for turn in range(2):  # rank 0 first: it clears what a killed run left; then the others open the same progress
        if (rank == 0) == (turn == 0):
            writer = StoreWriter(
                store_dir, settings, n_models=2, d_model=d_model, dtype=cfg.dtype, lock=rank == 0, identity=identity
            )
        distributed.barrier()
    if writer.complete:
        return ActivationStore(store_dir)
    done = writer.progress
    start_block = done["n_blocks"]
    batches = iter_activations(traced, cfg, skip_sequences=start_block * cfg.seqs_per_shard, process=(rank, world))
    bar = progress(
        total=cfg.n_tokens,
        initial=done["n_tokens"],
        unit="tok",
        desc="collecting",
        disable=rank > 0,
    )
    for round_number in itertools.count():
        block = start_block + round_number * world + rank
        parts = list(itertools.islice(batches, cfg.seqs_per_shard // cfg.seqs_per_batch))
        counts = distributed.all_gather_cat(
            torch.tensor([sum(len(b.token_ids) for b in parts), len(parts)], device=device)[None]
        ).cpu()
        # the blocks of this round in order; the one that crosses n_tokens is cut there
        keep = max(0, min(int(counts[rank, 0]), cfg.n_tokens - done["n_tokens"] - int(counts[:rank, 0].sum())))
        rows = [torch.cat(column)[:keep] for column in zip(*parts)] or [torch.empty(0)] * 4
        stats = distributed.all_reduce(writer.write_shard(*rows, block=block).to(device)).cpu()
        if rank == 0:
            writer.record(stats, n_blocks=start_block + (round_number + 1) * world)
        else:
            done["n_tokens"] += int(stats[-2])
        bar.update(int(stats[-2]))
        if done["n_tokens"] >= cfg.n_tokens or counts[:, 1].sum() == 0:
            break
    bar.close()
    if done["n_tokens"] < cfg.n_tokens and rank == 0:
        warnings.warn(
            f"the dataset ran out after {done['n_tokens']} tokens of the {cfg.n_tokens} asked for", stacklevel=2
        )
    if rank == 0:
        writer.finish(**store_meta(cfg, pair, d_model), val_fraction=cfg.val_fraction)
    distributed.barrier()
    return ActivationStore(store_dir)


def store_meta(cfg: CollectConfig, pair: ModelPair, d_model: int) -> dict:
    """What a store's meta.json says of where its rows come from (the writer adds the counts and statistics)."""
    exclusions = {"bos": cfg.exclude_bos, "first_n": cfg.exclude_first_n, "token_ids": cfg.exclude_token_ids}
    dataset = cfg.dataset if isinstance(cfg.dataset, str) else f"<list of {len(cfg.dataset)} texts>"
    return dict(
        models=list(pair.names),
        revisions=[cfg.base_revision, cfg.finetuned_revision],
        site=cfg.site,
        layer=cfg.layer,
        d_model=d_model,
        n_models=2,
        exclusions=exclusions,
        dataset={"name": dataset, "split": cfg.split, "text_column": cfg.text_column},
        seq_len=cfg.seq_len,
    )

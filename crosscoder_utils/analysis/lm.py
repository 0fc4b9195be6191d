"""What the language models say: per-token KL between the pair, the share of the activation difference a
set of latents reconstructs, and the loss when the crosscoder's reconstruction is spliced into each model."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..collect import TracedPair, collection_settings, keep_mask, stored_documents
from ..crosscoder import CrossCoder
from ..models import ModelPair
from ..notebook import progress
from ..store import ActivationStore
from .contexts import context
from .encoding import Encoded


class TokenDivergence(NamedTuple):
    """Where the models differ, per held-out token (the store rows of a split)."""

    rows: np.ndarray
    """int64 [n] store rows."""
    kl: torch.Tensor
    """[n] KL(finetuned ‖ base) of the next-token distributions at each row, nats."""
    activation_difference: torch.Tensor
    """[n] ‖x_finetuned − x_base‖ at the site, normalised units."""
    documents: list[list[int]]
    """The token ids of the documents ``rows`` come from, tokenised again and checked against the store (the
    patching and steering run on them without tokenising the dataset again)."""
    first_document: int
    """The number of ``documents[0]``."""
    seconds: float
    """What computing the KL took: tokenising the documents again and both models' forwards over them (06 reports
    it as the per-token methods' cost; a KL read from the store's ``token_kl/`` keeps its first computation's)."""

    def document(self, number: int) -> list[int]:
        """Document ``number``'s token ids; it must be one of ``rows``' documents."""
        if not 0 <= number - self.first_document < len(self.documents):
            raise ValueError(
                f"document {number} is not among the held-out documents read ({self.first_document} to "
                f"{self.first_document + len(self.documents) - 1})"
            )
        return self.documents[number - self.first_document]


@torch.no_grad()
def token_divergence(
    pair: ModelPair,
    store: ActivationStore,
    factors: torch.Tensor,
    model_index: int = 1,
    split: str = "val",
    seqs_per_batch: int = 4,
    max_tokens: int | None = None,
) -> TokenDivergence:
    """KL(model_index ‖ base) of the next-token distributions, and the norm of the activation difference at the
    site, on every stored token of a split (its first ``max_tokens``, as ``encode`` reads them):
    the baseline view of where two models differ, which also checks the crosscoder against the models
    themselves. The split's documents are tokenised again from the store's dataset and run through both
    models, ``seqs_per_batch`` at a time (at Gemma-2-2B's 256k vocabulary and 1024-token documents, the
    float32 distributions of 4 take 29 GiB of GPU memory, of 16 88 GiB, for the same speed).

    The KL of a local store's rows is kept in the store (``token_kl/``, with the seconds it took), so 04, 06 and
    the runs of other seeds on the store compute it once: it depends on the models and the documents only, and
    ``analyse`` refuses models or data that changed since collection (``check_inputs``) before it reads it."""
    start_time = time.perf_counter()
    cfg = collection_settings(store, "per-token divergence")
    span = store.split_range(split)
    rows = np.arange(span.start, span.stop if max_tokens is None else min(span.stop, span.start + max_tokens))
    seq, pos = (t.numpy() for t in store.positions(rows))
    sequences, first = stored_documents(store, pair.tokenizer, rows)
    cache = None if store.remote else Path(store.root, "token_kl", f"model{model_index}_rows{rows[0]}-{rows[-1]}")
    if cache and cache.with_suffix(".safetensors").exists():
        with safe_open(cache.with_suffix(".safetensors"), "pt") as saved:
            kl, seconds = saved.get_tensor("kl"), float(saved.metadata()["seconds"])
    else:
        traced = TracedPair(pair, cfg.site, cfg.layer, "right")
        kl = torch.zeros(len(rows))
        for start in progress(range(0, len(sequences), seqs_per_batch), desc="per-token KL"):
            ids, mask, positions = traced.pad(sequences[start : start + seqs_per_batch])
            logps = [F.log_softmax(traced.logits(m, ids, mask, positions).float(), -1) for m in (0, model_index)]
            per_token = (logps[1].exp() * (logps[1] - logps[0])).sum(-1).cpu()  # [batch, seq]
            in_batch = (seq >= first + start) & (seq < first + start + seqs_per_batch)
            kl[in_batch] = per_token[seq[in_batch] - first - start, pos[in_batch]]
        seconds = time.perf_counter() - start_time
        if cache:
            keep_kl(cache, kl, seconds)
    difference = []
    for start in range(0, len(rows), 65_536):  # read in chunks: memory does not grow with max_tokens' rows
        x = store.read(rows[start : start + 65_536]) * factors[None, :, None]
        difference.append((x[:, model_index] - x[:, 0]).norm(dim=-1))
    return TokenDivergence(rows, kl, torch.cat(difference), sequences, first, seconds)


def keep_kl(cache: Path, kl: torch.Tensor, seconds: float) -> None:
    """Write ``kl`` and its seconds to ``cache``.safetensors atomically; a store on read-only disk keeps none."""
    try:
        cache.parent.mkdir(exist_ok=True)
        save_file({"kl": kl}, cache.with_suffix(".tmp"), metadata={"seconds": str(seconds)})
        os.replace(cache.with_suffix(".tmp"), cache.with_suffix(".safetensors"))
    except PermissionError:
        pass


@torch.no_grad()
def difference_explained(
    cc: CrossCoder, encoded: Encoded, store: ActivationStore, factors: torch.Tensor, latents, rows, model_index: int = 1
) -> float:
    """Fraction of the activation difference x_m − x_base (summed squares over store ``rows``, among those
    encoded) that the crosscoder reconstructs from ``latents`` alone: 1 − Σ‖Δx − Δx̂‖² / Σ‖Δx‖², where
    Δx̂ = Δb_dec + Σ_{i ∈ latents} f_i (d_m,i − d_base,i)."""
    rows = np.sort(np.asarray(rows))
    positions = np.searchsorted(encoded.rows, rows)
    if not np.array_equal(encoded.rows[positions.clip(max=encoded.n_tokens - 1)], rows):
        raise ValueError("difference_explained: some rows were not encoded")
    latents = torch.as_tensor(latents, dtype=torch.long)
    delta = (cc.W_dec[latents, model_index] - cc.W_dec[latents, 0]).detach()
    bias = (cc.b_dec[model_index] - cc.b_dec[0]).detach()
    residual = total = 0.0
    for start in range(0, len(rows), 4096):
        x = store.read(rows[start : start + 4096]) * factors[None, :, None]
        difference = x[:, model_index] - x[:, 0]
        predicted = bias + encoded.activations(latents, positions[start : start + 4096]) @ delta
        residual += float((difference - predicted).pow(2).sum())
        total += float(difference.pow(2).sum())
    return 1 - residual / max(total, 1e-12)


class SplicedLoss(NamedTuple):
    ce_clean: float
    """Next-token loss of the unmodified model."""
    ce_spliced: float
    """... with its site activation replaced by the crosscoder's reconstruction."""
    ce_zero: float
    """... with its site activation replaced by zeros."""
    loss_recovered: float
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean)."""
    kl: float
    """Mean KL(clean ‖ spliced) per token."""

    def as_row(self, role: str) -> dict:
        """The model's losses as a row of 04's table."""
        return {
            "model": role,
            "CE clean": round(self.ce_clean, 3),
            "CE spliced": round(self.ce_spliced, 3),
            "CE zero": round(self.ce_zero, 3),
            "loss recovered": f"{self.loss_recovered:.1%}",
            "KL(clean || spliced)": round(self.kl, 4),
        }


@torch.no_grad()
def spliced_loss(
    raw_cc: CrossCoder, pair: ModelPair, store: ActivationStore, n_sequences: int = 64, seqs_per_batch: int = 4
) -> list[SplicedLoss]:
    """Per model, the loss when the crosscoder's reconstruction replaces the site activation, on held-out
    documents: those after the store's last document, or when the dataset ran out, the store's val documents.
    ``raw_cc`` reads raw activations (``run_dir/raw``).

    Only the tokens the store kept are replaced (BOS and other exclusions stay clean, as in training)."""
    cfg = collection_settings(store, "spliced-in evaluation")
    tokenizer = pair.tokenizer
    last_rows = np.arange(max(0, len(store) - cfg.seq_len), len(store))  # the store's last document among them
    last_rows = last_rows[store.positions(last_rows)[0].numpy() == int(store.positions([len(store) - 1])[0])]
    sequences = stored_documents(store, tokenizer, last_rows, extra=n_sequences)[0][1:]
    val = store.split_range("val")
    if not sequences and len(val):  # the store used every document: its val documents were never trained on
        rows = np.arange(val.start, min(val.stop, val.start + n_sequences * cfg.seq_len))
        sequences = stored_documents(store, tokenizer, rows)[0][:n_sequences]
    if not sequences:
        raise ValueError("no held-out documents: the store used every document of its dataset and has no val split")
    traced = TracedPair(pair, cfg.site, cfg.layer, "right")
    n_models = len(pair.models)
    totals = np.zeros((n_models, 4))  # ce clean, spliced, zero, kl (summed over predicted tokens)
    n_predicted = 0
    for start in progress(range(0, len(sequences), seqs_per_batch), desc="spliced-in loss"):
        ids, mask, pos = traced.pad(sequences[start : start + seqs_per_batch])
        clean = traced.activations(ids, mask, pos)  # [batch, seq, model, d]
        keep = keep_mask(ids, mask, pos, cfg, tokenizer.bos_token_id)[..., None, None]
        spliced = torch.where(keep, raw_cc(clean.float().flatten(0, 1)).view_as(clean).to(clean.dtype), clean)
        zeroed = torch.where(keep, torch.zeros_like(clean), clean)
        predicted = mask[:, 1:].bool()
        targets = ids[:, 1:][predicted]
        for m in range(n_models):
            logps = [
                F.log_softmax(traced.logits(m, ids, mask, pos, replacement)[:, :-1][predicted].float(), -1)
                for replacement in (None, spliced[:, :, m], zeroed[:, :, m])
            ]
            ce = [-lp.gather(1, targets[:, None]).sum().item() for lp in logps]
            kl = F.kl_div(logps[1], logps[0], log_target=True, reduction="sum").item()
            totals[m] += ce + [kl]
        n_predicted += int(predicted.sum())
    return [
        SplicedLoss(clean, spliced, zero, (zero - spliced) / (zero - clean), kl)
        for clean, spliced, zero, kl in totals / n_predicted
    ]


def most_divergent(divergence: TokenDivergence, n: int) -> np.ndarray:
    """Store rows of the held-out tokens with the highest KL: the top 1 % of them, and at least ``n``."""
    order = divergence.kl.argsort(descending=True)
    return divergence.rows[order[: max(n, len(order) // 100)].numpy()]


def divergent_tokens(divergence: TokenDivergence, rows: np.ndarray, store: ActivationStore, tokenizer) -> list[dict]:
    """The divergent ``rows`` (``most_divergent``) grouped by token, in order of each token's first (most
    divergent) row: its occurrences, mean KL, mean ‖x_ft − x_base‖ and the context of its most divergent row."""
    index = {row: i for i, row in enumerate(divergence.rows.tolist())}
    groups: dict[str, list[int]] = {}
    for row, token in zip(rows.tolist(), store.token_ids(rows).tolist()):
        groups.setdefault(tokenizer.decode([token]), []).append(row)
    table = []
    for token, token_rows in groups.items():
        at = torch.tensor([index[row] for row in token_rows])
        table.append(
            {
                "token": token,
                "occurrences": len(token_rows),
                "mean KL": round(float(divergence.kl[at].double().mean()), 2),
                "mean |x_ft - x_base|": round(float(divergence.activation_difference[at].double().mean()), 2),
                "most divergent context": context(store, tokenizer, token_rows[0]),
            }
        )
    return table


def difference_explained_by_top(
    cc: CrossCoder,
    encoded: Encoded,
    store: ActivationStore,
    factors: torch.Tensor,
    order: torch.Tensor,
    n_top: int,
    rows,
) -> dict[str, float]:
    """``difference_explained`` on ``rows`` by no latent (the decoder bias alone), the top ``n_top`` of a
    ranking ``order``, and every latent."""
    sets = {
        "no latent (bias only)": [],
        f"top {n_top} latents": order[:n_top],
        "all latents": np.arange(cc.cfg.dict_size),
    }
    return {name: difference_explained(cc, encoded, store, factors, latents, rows) for name, latents in sets.items()}

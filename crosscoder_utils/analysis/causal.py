"""Is a latent what changed the model? Patching and steering with the top of the difference ranking.

Patching (the KL-closing test of Minder et al. 2025, "Overcoming sparsity artifacts in crosscoders"): a model's
layers after the site run on the *other* model's site activation plus some latents' share of the difference,
x_other + Σ_{j∈S} f_j (d_model,j − d_other,j), at the tokens the store keeps, so that the only difference left is
at the site. The share of KL(P_model ‖ P_model on x_other) that S closes says how much of what the model does
differently passes through those latents. The fine-tune's side runs the fine-tune's layers on the base's
activation; the base side the base's layers on the fine-tune's. Controls in the same run: as many random live
latents, the latents' decoder differences turned into random directions of the same norms, every latent (the
whole reconstructed difference: the ceiling) and the crosscoder's error term (what the reconstruction misses).

Steering: a model generates greedily from the contexts where a latent fires most (each up to the latent's token)
with α · (the latent's largest activation) · (d_other,j − d_model,j) added at the site at the latent's token,
where it fired, beside the other model's own continuation: the base steered by fine-tune-side latents, the
fine-tune by base-side ones.

Everything is in raw units: the run's ``raw`` crosscoder reads and writes the models' own activations."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..collect import TracedPair, collection_settings, keep_mask
from ..config import model_roles
from ..notebook import progress

if TYPE_CHECKING:
    from .pipeline import Analysis
    from .ranking import Answer, DifferenceTable, RoleReport

SET_SIZES = (1, 2, 5, 10, 20)
"""The top-k sets patched together (the paper's curve of the KL closed against k)."""


def percent(value: float, digits: int = 0) -> str:
    """A share as a percentage ("-" for NaN: no token to measure it on; no sign on a share that rounds to 0)."""
    if math.isnan(value):
        return "-"
    text = f"{value:.{digits}%}"
    return text.lstrip("-") if float(text[:-1]) == 0 else text


class Closed(NamedTuple):
    """The share of the KL a patch closes: 1 − Σ KL(P ‖ P patched) / Σ KL(P ‖ P on the other activation)."""

    everywhere: float
    """Over every kept token of the patched documents."""
    where: float
    """Over the tokens where the tested latents fire (NaN where they do not fire in these documents)."""


class LatentPatch(NamedTuple):
    """One latent or top-k set patched, with its controls scored on the same tokens."""

    name: str
    """``latent 45`` or ``top 5``."""
    latents: list[int]
    n_where: int
    """Kept tokens of the patched documents where the latents fire."""
    closed: Closed
    random_directions: Closed
    """The same activations along random directions with the norms of the decoder differences."""
    random_latents: Closed
    """As many random live latents (the mean of ``n_random`` draws), scored where the tested latents fire."""
    kl_where: float
    """Mean KL per token before patching where the latents fire, nats."""

    def as_row(self) -> dict:
        return {
            "patched": self.name,
            "tokens where it fires": self.n_where,
            "KL there (nats)": round(self.kl_where, 3),
            "closed where it fires": percent(self.closed.where),
            "random directions there": percent(self.random_directions.where),
            "random latents there": percent(self.random_latents.where),
            "closed on all tokens": percent(self.closed.everywhere),
            "random directions, all": percent(self.random_directions.everywhere),
            "random latents, all": percent(self.random_latents.everywhere),
        }

    def causal(self, min_closed: float) -> bool:
        """Closes at least ``min_closed`` of the KL where it fires, more than either control does there."""
        controls = max(self.random_directions.where, self.random_latents.where)
        return self.closed.where >= min_closed and self.closed.where > controls


class Patching(NamedTuple):
    """The patching of one side (``patch``): each latent, each top-k set and the ceilings."""

    model: str
    """The role whose layers run (on the other model's activation): ``finetuned`` or ``base``."""
    other: str
    n_documents: int
    n_tokens: int
    kl: float
    """Mean KL(P_model ‖ P_model on x_other) per kept token: what there is to close, nats."""
    latents: list[LatentPatch]
    sets: list[LatentPatch]
    all_latents: float
    """Share closed by every latent: x_other + (x̂_model − x̂_other), the whole reconstructed difference."""
    error_term: float
    """Share closed by the crosscoder's error alone: x_other + (ε_model − ε_other)."""

    def of(self, latent: int) -> LatentPatch | None:
        return next((p for p in self.latents if p.latents == [latent]), None)


def _documents(analysis: Analysis, latents: list[int], n_documents: int) -> tuple[list[list[int]], list[int]]:
    """The patched documents: the first ``n_documents`` of the held-out rows read, and each latent's top document
    (so that every latent fires somewhere), as the KL pass tokenised them, with their numbers."""
    store, encoded = analysis.run.store, analysis.encoded
    seq = store.positions(encoded.rows)[0].numpy()
    chosen = list(dict.fromkeys(seq.tolist()))[:n_documents]
    for latent in latents:
        fired = (encoded.latent == latent).nonzero().squeeze(1)
        if len(fired):
            chosen.append(int(seq[encoded.token[fired[encoded.value[fired].argmax()]]]))
    chosen = sorted(set(chosen))
    return [analysis.divergence.document(number) for number in chosen], chosen


def _random_directions(deltas: torch.Tensor, seed: int) -> torch.Tensor:
    """[dict, d] a random direction per latent with the norm of its decoder difference."""
    random = torch.randn(deltas.shape, generator=torch.Generator().manual_seed(seed)).to(deltas)
    return random / random.norm(dim=1, keepdim=True) * deltas.norm(dim=1, keepdim=True)


@torch.no_grad()
def patch(
    analysis: Analysis,
    latents: list[int],
    model_index: int = 1,
    set_sizes: tuple[int, ...] = SET_SIZES,
    n_random: int = 3,
    n_documents: int = 32,
    seqs_per_batch: int = 4,
    seed: int = 0,
) -> Patching:
    """Patch each of ``latents`` (in ranking order), and their first k for each k of ``set_sizes``, into the
    layers of model ``model_index`` (1: the fine-tune, run on the base's activation; 0: the base, run on the
    fine-tune's), with the controls (module docstring), on the held-out documents ``_documents`` picks. One
    forward of one model per patch and batch: per batch, 4 (the two models to the site, the clean logits, the
    unpatched baseline) + 2·len(latents) + 2·(sets of k > 1) + n_random·(set sizes) + 2 (every latent, the error)."""
    if analysis.pair is None:
        raise ValueError("patching needs the models: a store collected from models (not from_arrays)")
    if not latents:
        raise ValueError("patch: no latents given")
    store, pair, cc = analysis.run.store, analysis.pair, analysis.run.raw.to(analysis.pair.base.device)
    cfg = collection_settings(store, "patching")
    other = 1 if model_index == 0 else 0
    live = torch.nonzero(analysis.encoded.frequency > 0).squeeze(1)
    sizes = [k for k in set_sizes if k <= len(latents)] or [1]
    generator = torch.Generator().manual_seed(seed)
    candidates = live[~torch.isin(live, torch.tensor(latents))]
    draws = {
        k: [candidates[torch.randperm(len(candidates), generator=generator)[:k]].tolist() for _ in range(n_random)]
        for k in sorted(set(sizes) | {1})
    }
    deltas = (cc.W_dec[:, model_index] - cc.W_dec[:, other]).detach()
    directions = _random_directions(deltas, seed)
    tested = [[latent] for latent in latents] + [latents[:k] for k in sizes if k > 1]
    specs = (
        [("delta", [])]
        + [("delta", s) for s in tested]
        + [("random", s) for s in tested]
        + [("delta", s) for k in draws for s in draws[k]]
        + [("all", []), ("error", [])]
    )
    sequences, _ = _documents(analysis, latents, n_documents)
    traced = TracedPair(pair, cfg.site, cfg.layer, "right")
    kl, fired = [[] for _ in specs], []
    for start in progress(range(0, len(sequences), seqs_per_batch), desc=f"patching ({model_roles(2)[model_index]})"):
        ids, mask, pos = traced.pad(sequences[start : start + seqs_per_batch])
        keep = keep_mask(ids, mask, pos, cfg, pair.tokenizer.bos_token_id)
        activations = traced.activations(ids, mask, pos)  # [batch, seq, models, d]
        own, x = activations[:, :, model_index], activations[keep].float()
        f = cc.encode(x)
        x_hat = cc.decode(f)
        clean = F.log_softmax(traced.logits(model_index, ids, mask, pos).float(), -1)[keep]
        for i, (what, chosen) in enumerate(specs):
            if what == "all":
                vector = x_hat[:, model_index] - x_hat[:, other]
            elif what == "error":
                vector = (x - x_hat)[:, model_index] - (x - x_hat)[:, other]
            else:  # the empty set: no patch, the baseline
                vector = f[:, chosen] @ (deltas if what == "delta" else directions)[chosen]
            replacement = own.clone()
            replacement[keep] = (x[:, other] + vector).to(own.dtype)
            patched = F.log_softmax(traced.logits(model_index, ids, mask, pos, replacement).float(), -1)[keep]
            kl[i].append((clean.exp() * (clean - patched)).sum(-1).cpu())
        fired.append((f[:, latents] > 0).cpu())
    kl, fired = [torch.cat(k).double() for k in kl], torch.cat(fired)
    baseline = kl[0]
    closed = lambda values, where: 1 - float(values[where].sum() / baseline[where].sum()) if where.any() else math.nan
    everywhere = torch.ones(len(baseline), dtype=torch.bool)
    index = {(what, tuple(chosen)): i for i, (what, chosen) in enumerate(specs)}

    column = {latent: i for i, latent in enumerate(latents)}

    def tested_row(chosen: list[int]) -> LatentPatch:
        where = fired[:, [column[latent] for latent in chosen]].any(1)
        share = lambda what, s: Closed(*(closed(kl[index[what, tuple(s)]], w) for w in (everywhere, where)))
        randoms = [share("delta", s) for s in draws[len(chosen)]]
        name = f"latent {chosen[0]}" if len(chosen) == 1 else f"top {len(chosen)}"
        return LatentPatch(
            name,
            chosen,
            int(where.sum()),
            share("delta", chosen),
            share("random", chosen),
            Closed(*(float(np.mean([r[i] for r in randoms])) for i in range(2))),
            float(baseline[where].mean()) if where.any() else math.nan,
        )

    return Patching(
        model_roles(2)[model_index],
        model_roles(2)[other],
        len(sequences),
        len(baseline),
        float(baseline.mean()),
        [tested_row(s) for s in tested if len(s) == 1],
        [tested_row(latents[:k]) for k in sizes],
        closed(kl[index["all", ()]], everywhere),
        closed(kl[index["error", ()]], everywhere),
    )


class Steering(NamedTuple):
    """A model steered by one latent from one of its top contexts (``steer``)."""

    latent: int
    model: str
    """The role steered."""
    other: str
    prompt: str
    """The context's last tokens, the latent's token in «»."""
    alphas: list[float]
    continuations: list[str]
    """The steered model's greedy continuation at each α (α 0: its own)."""
    other_continuation: str
    """The other model's own continuation: what the steering is read against."""

    def as_row(self) -> dict:
        return {
            "latent": self.latent,
            "prompt": self.prompt,
            **{f"{self.model} α={alpha:g}": text for alpha, text in zip(self.alphas, self.continuations)},
            f"{self.other} (own)": self.other_continuation,
        }


def _top_rows(analysis: Analysis, latent: int, n: int) -> list[int]:
    """The store rows of a latent's ``n`` largest held-out activations, one per document."""
    encoded, store = analysis.encoded, analysis.run.store
    fired = (encoded.latent == latent).nonzero().squeeze(1)
    rows = encoded.rows[encoded.token[fired[encoded.value[fired].argsort(descending=True)]].numpy()]
    documents = store.positions(rows)[0].tolist()
    return [int(rows[i]) for i in sorted({d: i for i, d in reversed(list(enumerate(documents)))}.values())][:n]


def _generate(traced: TracedPair, m: int, ids: torch.Tensor, added: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuations [batch, n_new] of model ``m`` from ``ids`` [batch, L] with ``added`` [batch, d] added to
    its site activation at the prompt's last token (where the latent fired), after which the model runs on its
    own. A forward hook on the prompt's pass rather than an nnsight trace: ``generate`` then runs one new token a
    step through the KV cache, which carries the change."""
    model, site = traced.pair.models[m], traced.sites[m]
    module = model.get_submodule(site.module_path)
    calls = []

    def add(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        if len(calls) > 1:  # a generated token's step
            return hidden
        hidden = hidden.clone()
        hidden[:, -1] += added.to(hidden.dtype)
        return hidden

    if site.read_input:
        handle = module.register_forward_pre_hook(
            lambda _, args, kwargs: (
                ((add(args[0]), *args[1:]), kwargs)
                if args
                else (args, {**kwargs, "hidden_states": add(kwargs["hidden_states"])})
            ),
            with_kwargs=True,
        )
    else:
        handle = module.register_forward_hook(
            lambda _, args, output: (add(output[0]), *output[1:]) if isinstance(output, tuple) else add(output)
        )
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=traced.pad_id,
        )
    finally:
        handle.remove()
    return out[:, ids.shape[1] :]


def _until_end(ids: torch.Tensor, end: int | None) -> list[int]:
    """A continuation's tokens up to its first ``end`` token (kept): what follows is padding."""
    ids = ids.tolist()
    return ids[: ids.index(end) + 1] if end in ids else ids


@torch.no_grad()
def steer(
    analysis: Analysis,
    latent: int,
    model_index: int = 0,
    alphas: tuple[float, ...] = (0, 1, 2, 4),
    n_prompts: int = 2,
    n_new: int = 8,
    width: int = 12,
) -> list[Steering]:
    """Model ``model_index`` (0: the base, steered towards the fine-tune; 1: the fine-tune, towards the base)
    continues each of ``latent``'s top ``n_prompts`` held-out contexts (distinct, up to its token)
    greedily for ``n_new`` tokens, with α · (the latent's largest held-out activation) · (d_other − d_model)
    added at the site (raw units) at the latent's token for each α, beside the other model's own continuation;
    the prompt shown as its last ``width`` tokens."""
    if analysis.pair is None:
        raise ValueError("steering needs the models: a store collected from models (not from_arrays)")
    store, pair, raw = analysis.run.store, analysis.pair, analysis.run.raw
    cfg = collection_settings(store, "steering")
    other = 1 if model_index == 0 else 0
    fired = analysis.encoded.latent == latent
    if not fired.any():
        raise ValueError(f"latent {latent} never fires on the held-out tokens read: nothing to steer from")
    largest = float(analysis.encoded.value[fired].max())
    vector = (raw.W_dec[latent, other] - raw.W_dec[latent, model_index]).detach() * largest
    traced = TracedPair(pair, cfg.site, cfg.layer)
    seq, pos = (t.tolist() for t in store.positions(_top_rows(analysis, latent, 4 * n_prompts)))
    prompts = dict.fromkeys(tuple(analysis.divergence.document(d)[: p + 1]) for d, p in zip(seq, pos))  # distinct
    decode = lambda ids: pair.tokenizer.decode(_until_end(ids, pair.tokenizer.eos_token_id))
    steerings = []
    scale = torch.tensor(alphas, dtype=torch.float32, device=traced.device)[:, None]
    for tokens in list(prompts)[:n_prompts]:
        prompt = torch.tensor([tokens], device=traced.device)
        steered = _generate(traced, model_index, prompt.expand(len(alphas), -1), scale * vector.to(scale), n_new)
        own = _generate(traced, other, prompt, torch.zeros_like(vector)[None], n_new)
        shown = prompt[0, -width:]
        text = decode(shown[:-1]) + f"«{decode(shown[-1:])}»"
        steerings.append(
            Steering(
                latent,
                model_roles(2)[model_index],
                model_roles(2)[other],
                text,
                list(alphas),
                [decode(ids) for ids in steered],
                decode(own[0]),
            )
        )
    return steerings


def causal_sentence(patching: Patching, min_closed: float = 0.5) -> str:
    """Which patched latents are causal (``LatentPatch.causal``), each with the share it closes where it fires
    against the controls there, then the top-k sets and the ceilings, from ``patching``'s own numbers."""
    side = (
        f"the {patching.model}'s layers on the {patching.other}'s activation, {patching.n_documents} held-out "
        f"documents, {patching.kl:.3f} nats a token to close"
    )
    causal = [p for p in patching.latents if p.causal(min_closed)]
    others = [p for p in patching.latents if not p.causal(min_closed)]
    shown = lambda p: (
        f"{p.latents[0]} {percent(p.closed.where)} (random latents {percent(p.random_latents.where)}, random"
        f" directions {percent(p.random_directions.where)})"
    )
    sentence = (
        f"Patching ({side}): {len(causal)} of the {len(patching.latents)} latents patched close at least"
        f" {min_closed:.0%} of the KL where they fire, more than random latents and random directions of the same"
        " norms do there"
    )
    sentence += (": latent" + "s" * (len(causal) > 1) + " " + "; ".join(map(shown, causal))) if causal else ""
    if others:
        sentence += "; not: " + "; ".join(map(shown, others))
    largest = patching.sets[-1]
    together = (
        f"; the top {len(largest.latents)} together close {percent(largest.closed.everywhere)} of the KL on all tokens"
        f" (random latents {percent(largest.random_latents.everywhere)}, random directions"
        f" {percent(largest.random_directions.everywhere)})"
    )
    return (
        sentence
        + together * (len(largest.latents) > 1)
        + f". Every latent closes {percent(patching.all_latents)} of it, the error term alone"
        f" {percent(patching.error_term)}."
    )


def evidence(patchings: list[Patching], steerings: list[Steering]) -> dict[int, dict]:
    """Latent -> what the patching and steering showed of it, as the dashboard's pages and summary.json keep
    it: per side patched, its row (``LatentPatch.as_row``), and its steerings."""
    found: dict[int, dict] = {}
    for patching in patchings:
        for p in patching.latents:
            found.setdefault(p.latents[0], {}).setdefault("patching", {})[patching.model] = p.as_row()
    for s in steerings:
        found.setdefault(s.latent, {}).setdefault("steering", []).append(s._asdict())
    return found


def causal_tests(analysis: Analysis, answered: Answer, table: DifferenceTable) -> tuple[list[Patching], list[Steering]]:
    """04's causal tests of the first fine-tune's ``answered`` top (``analysis.cfg``'s ``n_patched``,
    ``patch_documents``, ``n_steered``, ``n_contexts``, ``steer_tokens``): its first ``n_patched`` latents patched
    into the fine-tune, the first quarter (at least 1) of its base-side top patched into the base, and the first
    ``n_steered`` of each steering the other model."""
    cfg = analysis.cfg
    if not cfg.n_patched:
        return [], []
    latents = answered.top.latents[: cfg.n_patched]
    base_side = sorted({i for group in answered.base_groups for i in group.latents}, key=table.rank)
    base_side = base_side[: max(1, cfg.n_patched // 4)]
    patchings = [patch(analysis, latents, 1, n_documents=cfg.patch_documents)]
    if base_side:
        patchings.append(patch(analysis, base_side, 0, set_sizes=(1,), n_documents=cfg.patch_documents))
    steerings = [
        steering
        for model_index, chosen in ((0, latents), (1, base_side))
        for latent in chosen[: cfg.n_steered]
        for steering in steer(analysis, latent, model_index, n_prompts=cfg.n_contexts, n_new=cfg.steer_tokens)
    ]
    return patchings, steerings


def with_causal(report: RoleReport, patchings: list[Patching], min_closed: float) -> RoleReport:
    """``report`` with its verdict followed by what patching its top showed (``causal_sentence``, each side)."""
    said = " ".join([report.verdict] + [causal_sentence(patching, min_closed) for patching in patchings])
    return report._replace(verdict=said)

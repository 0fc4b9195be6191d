"""``analyse``: the one encoding pass over a run's held-out split that 04 and the dashboard read."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..collect import check_inputs, store_models
from ..config import AnalysisConfig, model_roles
from ..models import ModelPair
from ..organism import Organism
from ..run import Run, load_run
from .encoding import Encoded, encode
from .explanations import Explanations, explain
from .health import Health, dictionary_health
from .lm import TokenDivergence, token_divergence
from .planted import BehaviourMatch, behaviour_labels, best_latents, main_behaviours, store_organism
from .ranking import DifferenceTable, difference_table


class Analysis(NamedTuple):
    """What 04 and the dashboard read off a run, from one encoding pass over its held-out split."""

    run_dir: Path
    cfg: AnalysisConfig
    """The settings it was read with."""
    run: Run
    encoded: Encoded
    pair: ModelPair | None
    """The models, for a store collected from them (else None)."""
    divergence: TokenDivergence | None
    """Per-token KL between the base and the first fine-tune (None without models)."""
    tables: dict[str, DifferenceTable]
    """Each fine-tune's role -> its difference table against the base."""
    organism: Organism | None
    """The organism whose corpus the store came from (``store_organism``), else None."""
    labels: dict | None
    """On the organism: each planted behaviour's store rows (``behaviour_labels``: name -> bool [len(store)])."""
    matches: dict[str, BehaviourMatch] | None
    """On the organism: each planted behaviour's best latent (against the first fine-tune), else None."""
    mains: dict | None
    """On the organism: the latents that fire mostly on one planted behaviour (``main_behaviours``)."""
    planted_kinds: dict | None
    """On the organism: each planted behaviour's kind (added, removed, changed), else None."""
    health: Health
    """The dictionary's dead latents and duplicate groups on the held-out tokens read."""
    explanations: Explanations | None
    """Each latent's rule of where it fires, with its detection F1 (``explanations.explain``); None for a run
    read by ``reanalyse``."""


def analyse(run_dir: str | Path, cfg: AnalysisConfig = AnalysisConfig(), device: str = "auto") -> Analysis:
    """Read a finished run: encode its store's held-out split once (its first ``cfg.max_tokens`` tokens) on
    ``device``, and, for a store collected from models, load them as 01 did (checked to be those the store
    came from) for the per-token KL; then each fine-tune's difference table, the dictionary's health, every
    latent's explanation and, when the store is the organism's (``store_organism``), the planted behaviours'
    latents. Every input is checked before the first forward."""
    run = load_run(run_dir)
    store = run.store
    if not len(store.split_range("val")):
        raise ValueError(f"the store at {store.path} has no held-out rows to analyse: collect it with val_fraction > 0")
    organism = store_organism(store)
    pair = store_models(store, device) if store.collected_from_models else None
    if pair:
        check_inputs(store, pair)  # the models and data are still those the store was collected from
    divergence = token_divergence(pair, store, run.norm_factors, max_tokens=cfg.max_tokens) if pair else None
    labels = behaviour_labels(store, organism) if organism else None
    return _read(Path(run_dir), run, cfg, device, pair, divergence, organism, labels, explained=True)


def reanalyse(analysis: Analysis, run_dir: str | Path, device: str = "auto") -> Analysis:
    """``analysis`` for another run trained on the same store (another training seed, ``train_seeds``): its own
    encoding, difference tables, health and planted matches, read with the same settings, models, per-token KL
    and labels; its latents are not explained (``explanations`` None)."""
    run = load_run(run_dir)
    if run.store.path != analysis.run.store.path:
        raise ValueError(f"{run_dir} was trained on {run.store.path}, not on {analysis.run.store.path}")
    pair, divergence, organism, labels = analysis.pair, analysis.divergence, analysis.organism, analysis.labels
    return _read(Path(run_dir), run, analysis.cfg, device, pair, divergence, organism, labels, explained=False)


def _read(run_dir, run, cfg, device, pair, divergence, organism, labels, explained: bool) -> Analysis:
    """``analyse``'s reading of one run, given what does not depend on the crosscoder (models, KL, labels)."""
    store = run.store
    encoded = encode(run.crosscoder, store, run.norm_factors, "val", cfg.tokens_per_batch, cfg.max_tokens, device)
    roles = model_roles(store.n_models)
    tables = {
        roles[m]: difference_table(
            run.crosscoder, encoded, divergence if m == 1 else None, m, cfg.exclusive_share, cfg.changed_cosine
        )
        for m in range(1, store.n_models)
    }
    matches = mains = planted_kinds = None
    if organism:
        matches, mains = best_latents(encoded, labels), main_behaviours(encoded, labels)
        planted_kinds = {name: behaviour["kind"] for name, behaviour in organism.planted["behaviours"].items()}
    health = dictionary_health(run.crosscoder, encoded)
    explanations = None
    if explained:
        fit = (  # the latents on training rows, which the explanations are fitted on
            encode(run.crosscoder, store, run.norm_factors, "train", cfg.tokens_per_batch, cfg.explain_tokens, device)
            if cfg.explain_tokens and len(store.split_range("train"))
            else None
        )
        explanations = explain(encoded, store, pair.tokenizer if pair else None, fit)
    return Analysis(
        run_dir,
        cfg,
        run,
        encoded,
        pair,
        divergence,
        tables,
        organism,
        labels,
        matches,
        mains,
        planted_kinds,
        health,
        explanations,
    )

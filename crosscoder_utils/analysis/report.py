"""The files 04 writes beside a run, each with its reader: latents.csv and summary.json."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import model_roles
from ..files import read_json, write_json
from .causal import Patching, percent
from .explanations import Explanations
from .kinds import LatentScaling, exclusive_latent_scaling
from .lm import SplicedLoss
from .planted import EXPECTED_KINDS
from .ranking import DifferenceTable, RoleReport

if TYPE_CHECKING:
    from .pipeline import Analysis


PATCH_COLUMNS = [
    f"{name}_{side}"
    for side in ("finetuned", "base")
    for name in ("kl_closed_where_fires", "kl_closed", "random_directions_where_fires", "random_latents_where_fires")
]
"""latents.csv's patching columns (``causal.patch``): the share of the KL each side's patch closes where the latent
fires and on all tokens, and its controls where it fires; empty for a latent not patched on that side."""


def patch_values(patchings: list[Patching]) -> dict[int, dict[str, str]]:
    """Latent -> its ``PATCH_COLUMNS`` values, from each side's patching."""
    values: dict[int, dict[str, str]] = {}
    for patching in patchings:
        for p in patching.latents:
            shares = (p.closed.where, p.closed.everywhere, p.random_directions.where, p.random_latents.where)
            names = PATCH_COLUMNS[:4] if patching.model == "finetuned" else PATCH_COLUMNS[4:]
            values.setdefault(p.latents[0], {}).update({n: f"{v:.4g}" for n, v in zip(names, shares)})
    return values


def write_latents_csv(
    table: DifferenceTable,
    scalings: dict[str, LatentScaling],
    explanations: Explanations,
    path: str | Path,
    patchings: list[Patching] = (),
) -> None:
    """The live latents by difference_score, then the dead ones: latent, kind, frequency, relative_norm,
    decoder_cosine, difference_score, nu_error, nu_reconstruction (ν empty where not exclusive), explanation,
    explanation_f1 (its detection F1; empty for a dead latent), and the ``PATCH_COLUMNS`` of ``patchings``."""
    nu = {}
    for scaling in scalings.values():
        for latent, error, reconstruction in zip(
            scaling.latents.tolist(), scaling.nu_error.tolist(), scaling.nu_reconstruction.tolist()
        ):
            nu[latent] = (f"{error:.4g}", f"{reconstruction:.4g}")
    dead = [i for i, kind in enumerate(table.kind) if kind == "dead"]
    columns = ["latent", "kind", "frequency", "relative_norm", "decoder_cosine", "difference_score"]
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns + ["nu_error", "nu_reconstruction", "explanation", "explanation_f1"] + PATCH_COLUMNS)
        patched = patch_values(patchings)
        for i in table.order.tolist() + dead:
            values = (table.frequency[i], table.relative_norm[i], table.decoder_cosine[i], table.difference_score[i])
            f1 = explanations.f1_text(i, 3)
            writer.writerow(
                [i, table.kind[i], *(f"{float(v):.6g}" for v in values), *nu.get(i, ("", "")), explanations.text[i], f1]
                + [patched.get(i, {}).get(name, "") for name in PATCH_COLUMNS]
            )


def read_latents_csv(path: str | Path) -> list[dict[str, str]]:
    """latents.csv (``write_latents_csv``) back, one dict per latent, values as written."""
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def write_latents_csvs(analysis: Analysis, out: Path, patchings: list[Patching] = ()) -> None:
    """latents.csv (with several fine-tunes, latents_<role>.csv for each) into ``out``; the first fine-tune's
    with ``patchings`` (``causal.causal_tests``)."""
    for index, (role, table) in enumerate(analysis.tables.items()):
        name = "latents.csv" if len(analysis.tables) == 1 else f"latents_{role}.csv"
        scalings = exclusive_latent_scaling(analysis.run.crosscoder, analysis.encoded, table)
        write_latents_csv(table, scalings, analysis.explanations, out / name, patchings if index == 0 else ())


def planted_rows(analysis: Analysis, table: DifferenceTable) -> list[dict]:
    """On the organism: each planted behaviour's best latent, its detection scores, kind and rank, as rows."""
    return [
        {
            "behaviour": name,
            "latent": m.latent,
            "precision": round(m.precision, 3),
            "recall": round(m.recall, 3),
            "F1": round(m.f1, 3),
            "threshold": round(m.threshold, 3),
            "F1 where it fires": round(m.f1_firing, 3),
            "planted as": analysis.planted_kinds[name],
            "kind": table.kind[m.latent],
            "as planted": table.kind[m.latent] in EXPECTED_KINDS[analysis.planted_kinds[name]],
            "rank": table.rank(m.latent),
            "relative norm": round(float(table.relative_norm[m.latent]), 3),
            "decoder cosine": round(float(table.decoder_cosine[m.latent]), 3),
            "tokens": m.n_tokens,
        }
        for name, m in (analysis.matches or {}).items()
    ]


def map_labels(table: DifferenceTable, matches: dict | None, n: int = 8) -> dict[int, str]:
    """Labels of the difference map: the top ``n`` latents, and each planted behaviour's best latent by name."""
    best_of = {m.latent: name for name, m in (matches or {}).items()}
    labels = {i: f"{i} {best_of.get(i, '')}".strip() for i in table.order[:n].tolist()}
    return labels | {latent: f"{latent} {name}" for latent, name in best_of.items()}


def write_summary(
    path: str | Path,
    analysis: Analysis,
    first: RoleReport,
    spliced: list[SplicedLoss],
    genuine: dict[str, int],
    explained: dict[str, float],
    over_seeds: list | None = None,
    patchings: list[Patching] = (),
) -> dict:
    """04's summary.json, written atomically at ``path`` and returned: the first fine-tune's verdict and phrase
    groups, the live latents by kind, the dictionary's health, L0 and explained variance, loss recovered,
    genuine exclusive latents, the difference the top latents reconstruct and, on the organism, each planted
    behaviour's F1 and rank, and with ``over_seeds`` (``seeds.planted_over_seeds``) on how many training seeds
    it is found and its F1 range there; with ``patchings`` (``causal.causal_tests``), the share of the KL each
    patched latent closes where it fires against its controls, each top-k set's on all tokens, and the
    ceilings."""
    encoded, table = analysis.encoded, first.table
    roles = model_roles(analysis.run.store.n_models)
    groups = lambda found: [{"phrase": group.phrase, "latents": group.latents} for group in found]
    matches = analysis.matches or {}
    values = {
        "verdict": first.verdict,
        "groups": groups(first.answer.groups),
        "base-side groups": groups(first.answer.base_groups),
        "live latents by kind": table.live_kinds(),
        "dictionary health": analysis.health.summary(),
        "L0": round(encoded.l0, 2),
        **{f"explained variance, {role}": round(v, 4) for role, v in encoded.explained_variance_by_model().items()},
        **{f"loss recovered, {role}": round(loss.loss_recovered, 4) for role, loss in zip(roles, spliced)},
        **{f"genuine {kind} (|nu| < {analysis.cfg.nu_threshold})": n for kind, n in genuine.items()},
        **{f"difference reconstructed, {name}": round(value, 4) for name, value in explained.items()},
        **{f"planted {name}: F1 / rank": f"{m.f1:.2f} / {table.rank(m.latent)}" for name, m in matches.items()},
        **{
            f"planted {b.behaviour}: found on seeds, F1": ", ".join(
                str(value) for key, value in b.as_row().items() if key in ("found on", "F1")
            )
            for b in over_seeds or []
        },
    }
    shares = lambda closed: f"{percent(closed.where, 1)} / {percent(closed.everywhere, 1)}"
    for patching in patchings:
        side = f"{patching.model}'s layers on the {patching.other}'s activation"
        for p in patching.latents + patching.sets[1:]:
            values[f"KL closed by {p.name} ({side}): where it fires / on all tokens"] = (
                f"{shares(p.closed)} (random latents {shares(p.random_latents)}, random directions"
                f" {shares(p.random_directions)})"
            )
        values[f"KL closed by every latent ({side})"] = percent(patching.all_latents, 1)
        values[f"KL closed by the error term ({side})"] = percent(patching.error_term, 1)
    write_json(path, values)
    return values


def read_summary(path: str | Path) -> dict:
    """summary.json back (``write_summary``); a damaged file is refused naming it."""
    return read_json(path)


def readable(values: dict) -> dict[str, str]:
    """A summary with each nested dict written inline (``a 1, b 2``), for a one-column table."""
    return {k: ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v for k, v in values.items()}

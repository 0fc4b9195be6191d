"""Latent dashboards: a static site with every live latent of a run, readable offline from disk.

``build_dashboard(analyse(run_dir))`` writes ``<run_dir>/dashboard/``::

    index.html           every live latent in one table, sortable by each column, filterable by kind and
                         searchable by explanation
    latent.html#<id>     one latent: contexts shaded by its activation, activation histogram, the tokens
                         each model's decoder vector promotes and suppresses, its statistics, links to the
                         previous and next latent of the difference ranking
    style.css, site.js   the page code (plain JS, no server, no CDN)
    data/index.js        the table's rows;  data/vocab.js  the token strings
    data/shard_NNNN.js   the per-latent data, ``latents_per_shard`` latents a file, loaded by latent.html

The data files are scripts that assign to ``window`` (a page opened from disk may not fetch JSON), so the
folder works as it is: opened from disk, zipped, or published.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import analysis as A
from .config import model_roles
from .models import top_logit_effects
from .notebook import progress
from .run import load_run

SITE = Path(__file__).parent / "site"
"""index.html, latent.html, style.css and site.js, copied into every dashboard."""


def _windows(store, rows: torch.Tensor, width: int) -> list[list[int]]:
    """For each store row, the rows of its sequence within ``width`` of it (the context shown)."""
    rows = rows.numpy()
    lows, highs = np.maximum(rows - width, 0), np.minimum(rows + width + 1, len(store))
    span = np.unique(np.concatenate([np.arange(lo, hi) for lo, hi in zip(lows, highs)]))
    seq = dict(zip(span.tolist(), store.positions(span)[0].tolist()))
    return [[r for r in range(lo, hi) if seq[r] == seq[row]] for row, lo, hi in zip(rows.tolist(), lows, highs)]


@torch.no_grad()
def _activations_at(cc, store, factors, pairs: list[tuple[int, int]], tokens_per_batch: int) -> dict:
    """(latent, row) -> the latent's activation at that store row, encoding each row needed once."""
    rows = np.unique([row for _, row in pairs])
    wanted: dict[int, list[int]] = {}
    for latent, row in pairs:
        wanted.setdefault(row, []).append(latent)
    values = {}
    for start in range(0, len(rows), tokens_per_batch):
        chunk = rows[start : start + tokens_per_batch]
        f = cc.encode(store.read(chunk) * factors[None, :, None])
        for i, row in enumerate(chunk.tolist()):
            for latent in wanted[row]:
                values[latent, row] = round(float(f[i, latent]), 4)
    return values


class Gathered(NamedTuple):
    """What the pages show beyond the difference table, read from the analysis's encoding pass."""

    contexts: dict
    """latent -> {"top" | "sampled": [(centre row, window rows, activation)]}."""
    activations: dict
    """(latent, row) -> the latent's activation at every row of its windows."""
    token_of: dict
    """store row -> token id, for every row shown."""
    logits: dict
    """role -> (promoted, suppressed) topk of each live latent's direct logit effect in that model."""
    nu: dict
    """latent -> (ν^ε, ν^r) of the live exclusive latents."""
    samples: A.LatentSamples


@torch.no_grad()
def gather(analysis: A.Analysis, n_top: int, n_sample: int, width: int, n_logits: int, tokens_per_batch: int):
    """Each live latent's ``n_top`` top contexts and ``n_sample`` sampled ones (``width`` tokens either side,
    with its activation on each token), its decoders' direct logit effects (raw units, through each model's
    unembedding) and its Latent Scaling ν."""
    run, encoded, pair = analysis.run, analysis.encoded, analysis.pair
    cc, store, table = run.crosscoder, run.store, next(iter(analysis.tables.values()))
    nu = {}
    for scaling in A.exclusive_latent_scaling(cc, encoded, table).values():
        nu.update(zip(scaling.latents.tolist(), zip(scaling.nu_error.tolist(), scaling.nu_reconstruction.tolist())))
    samples = A.latent_samples(encoded, n_top, n_sample)
    live = table.order.tolist()
    contexts: dict[int, dict] = {}
    pairs = []
    for latent in progress(live, desc="dashboard contexts"):
        found = {}
        for name, values, rows in (
            ("top", samples.top_values, samples.top_rows),
            ("sampled", samples.sample_values, samples.sample_rows),
        ):
            centres = rows[latent][rows[latent] >= 0]
            windows = _windows(store, centres, width) if len(centres) else []
            found[name] = list(zip(centres.tolist(), windows, values[latent][: len(centres)].tolist()))
            pairs += [(latent, row) for window in windows for row in window]
        contexts[latent] = found
    activations = _activations_at(cc, store, run.norm_factors, pairs, tokens_per_batch)
    rows_needed = sorted({row for _, row in pairs})
    token_of = dict(zip(rows_needed, store.token_ids(rows_needed).tolist())) if rows_needed else {}
    logits = {}
    for m, model in enumerate(pair.models if pair else []):
        logits[model_roles(store.n_models)[m]] = top_logit_effects(model, run.raw.W_dec[live, m].detach(), n_logits)
    return Gathered(contexts, activations, token_of, logits, nu, samples)


def index_row(analysis: A.Analysis, gathered: Gathered, latent: int, rank: int) -> dict:
    """A live latent's row of the index: its statistics, explanation and top context."""
    table, nu, mains = next(iter(analysis.tables.values())), gathered.nu, analysis.mains or {}
    top = gathered.contexts[latent]["top"]
    return {
        "latent": latent,
        "rank": rank,
        "kind": table.kind[latent],
        "difference_score": round(float(table.difference_score[latent]), 4),
        "frequency": round(float(table.frequency[latent]), 6),
        "relative_norm": round(float(table.relative_norm[latent]), 4),
        "decoder_cosine": round(float(table.decoder_cosine[latent]), 4),
        "nu_error": round(nu[latent][0], 4) if latent in nu else None,
        "nu_reconstruction": round(nu[latent][1], 4) if latent in nu else None,
        "explanation": analysis.explanations.text[latent],
        "explanation_f1": None if (f1 := float(analysis.explanations.f1[latent])) != f1 else round(f1, 3),
        "fires_on": mains[latent][0] if latent in mains else "",
        "context": [[gathered.token_of[r], gathered.activations[latent, r], r == top[0][0]] for r in top[0][1]]
        if top
        else [],
    }


def latent_page(gathered: Gathered, row: dict, live: list[int]) -> dict:
    """A live latent's page: its index ``row``, its neighbours in the ranking, its top and sampled contexts,
    the histogram of its sampled activations and its decoders' promoted and suppressed tokens."""
    latent, rank, samples = row["latent"], row["rank"], gathered.samples
    contexts = {
        name: [
            {
                "value": round(value, 4),
                "tokens": [[gathered.token_of[r], gathered.activations[latent, r], r] for r in window],
                "centre": centre,
            }
            for centre, window, value in gathered.contexts[latent][name]
        ]
        for name in ("top", "sampled")
    }
    sampled = samples.sample_values[latent][samples.sample_rows[latent] >= 0].numpy()
    effect = lambda topk, sign: [
        [int(t), round(sign * float(v), 3)] for t, v in zip(topk.indices[rank - 1], topk.values[rank - 1])
    ]
    return {
        **row,
        "previous": live[rank - 2] if rank > 1 else None,
        "next": live[rank] if rank < len(live) else None,
        **contexts,
        "histogram": np.histogram(sampled, bins=20)[0].tolist(),
        "histogram_max": float(samples.sample_values[latent].max()),
        "logits": {
            role: {"promoted": effect(up, 1), "suppressed": effect(down, -1)}
            for role, (up, down) in gathered.logits.items()
        },
    }


def write_data(path: Path, name: str, value, key: int | None = None) -> None:
    """A data file: a script that assigns ``value`` to ``window.<name>`` (with ``key``, to
    ``window.<name>[key]``, making the object when absent), since a page opened from disk may not fetch JSON."""
    path.write_text(f"{_target(name, key)} = {json.dumps(value, separators=(',', ':'))};\n")


def read_data(path: Path, name: str, key: int | None = None):
    """The value a data file (``write_data``) assigns."""
    return json.loads(path.read_text()[len(_target(name, key)) + 3 :].rstrip(";\n"))


def _target(name: str, key: int | None) -> str:
    return f"window.{name}" if key is None else f"window.{name} = window.{name} || {{}}; window.{name}[{key}]"


@torch.no_grad()
def build_dashboard(
    analysis: A.Analysis,
    out_dir: str | Path | None = None,
    n_top: int = 10,
    n_sample: int = 30,
    width: int = 8,
    n_logits: int = 8,
    latents_per_shard: int = 256,
    tokens_per_batch: int = 4096,
    evidence: dict[int, dict] | None = None,
) -> Path:
    """Write the dashboard of an analysed run (``analysis.analyse``; default ``<run_dir>/dashboard``);
    returns its folder.

    Everything comes from the analysis's one encoding pass over the held-out split: the ranking and kinds
    (the first fine-tune's ``difference_table``), Latent Scaling, the planted behaviour each latent fires on
    (on the organism), and each latent's ``n_top`` top contexts and ``n_sample`` contexts drawn uniformly
    from its firings (``analysis.latent_samples``, shown by activation quantile), ``width`` tokens either
    side (``gather``); then one index row and one page per live latent, written as data files. ``evidence``
    (``analysis.evidence``) adds the patching and steering of the latents tested to their pages."""
    gathered = gather(analysis, n_top, n_sample, width, n_logits, tokens_per_batch)
    table, store, pair = next(iter(analysis.tables.values())), analysis.run.store, analysis.pair
    live = table.order.tolist()
    index = [index_row(analysis, gathered, latent, rank) for rank, latent in enumerate(live, start=1)]
    shards: dict[int, dict] = {}
    for row in index:
        page = latent_page(gathered, row, live) | (evidence or {}).get(row["latent"], {})
        shards.setdefault(row["latent"] // latents_per_shard, {})[row["latent"]] = page
    vocab_ids = set(gathered.token_of.values())
    for up, down in gathered.logits.values():
        vocab_ids |= set(up.indices.flatten().tolist()) | set(down.indices.flatten().tolist())
    decode = (lambda t: pair.tokenizer.decode([t])) if pair else str
    meta = {
        "latents_per_shard": latents_per_shard,
        "run": str(analysis.run_dir),
        "roles": model_roles(store.n_models),
        "n_live": len(live),
        "n_dead": table.kind.count("dead"),
        "health": analysis.health.summary(),
        "shards": sorted(shards),
    }
    out = Path(out_dir) if out_dir else analysis.run_dir / "dashboard"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(SITE, out)
    (out / "data").mkdir()
    write_data(out / "data/vocab.js", "VOCAB", {t: decode(t) for t in sorted(vocab_ids)})
    write_data(out / "data/index.js", "LATENTS", index)
    write_data(out / "data/meta.js", "META", meta)
    for number, pages in shards.items():
        write_data(out / f"data/shard_{number:04d}.js", "SHARDS", pages, number)
    return out


def contexts_html(dashboard: str | Path, latents, n_contexts: int = 3) -> str:
    """HTML of some latents' top contexts, shaded by activation, read from a built dashboard (for a
    notebook: ``IPython.display.HTML``)."""
    dashboard = Path(dashboard)
    vocab = read_data(dashboard / "data/vocab.js", "VOCAB")
    per_shard = read_data(dashboard / "data/meta.js", "META")["latents_per_shard"]
    parts = []
    for latent in latents:
        number = latent // per_shard
        page = read_data(dashboard / f"data/shard_{number:04d}.js", "SHARDS", number)[str(latent)]
        peak = max([context["value"] for context in page["top"]] + [1e-9])
        lines = []
        for context in page["top"][:n_contexts]:
            spans = "".join(
                f'<span title="{value:.3f}" style="background: rgba(220, 60, 30, {min(1, max(0, value) / peak):.2f})'
                f'{"; border-bottom: 2px solid black" if row == context["centre"] else ""}">'
                f"{html.escape(vocab[str(token)])}</span>"
                for token, value, row in context["tokens"]
            )
            lines.append(f"<div style='font-family: monospace; white-space: pre'>{spans}</div>")
        link = (dashboard / "latent.html").resolve().as_uri() + f"#{latent}"
        parts.append(
            f"<p><a href='{link}'>latent {latent}</a> · rank {page['rank']} · {page['kind']} · difference score "
            f"{page['difference_score']:.2f} (KL where it fires) · frequency {page['frequency']:.3%}</p>"
            + "".join(lines)
        )
    return "\n".join(parts)


@torch.no_grad()
def show_prompt(run_dir: str | Path, text: str, n_latents: int = 3, device: str = "cpu") -> str:
    """HTML: both models run on ``text`` (loaded as 01 loads them, read at the run's site); for each token,
    the ``n_latents`` latents that fire most, with what each writes into each model (activation × that
    model's decoder norm, normalised units)."""
    from .collect import TracedPair, store_models, tokenize

    run = load_run(run_dir, device)
    store = run.store
    pair = store_models(store, device, "running the models on a prompt")
    traced = TracedPair(pair, store.meta["site"], store.meta["layer"])
    ids = next(tokenize([text], pair.tokenizer, None), None)
    if ids is None:
        raise ValueError(f"{text!r} has no tokens")
    x = traced.activations(*traced.pad([ids]))[0].float()  # [seq, n_models, d], raw
    f = run.raw.encode(x)
    writes = run.crosscoder.decoder_norms()  # [dict, n_models] normalised units
    roles = model_roles(store.n_models)
    header = "".join(f"<th>writes into {role}</th>" for role in roles)
    rows = []
    for position, token in enumerate(ids):
        values, latents = f[position].topk(n_latents)
        cells = [
            f"<td>{latent}</td><td>{value:.3f}</td>"
            + "".join(f"<td>{value * w:.3f}</td>" for w in writes[latent].tolist())
            for value, latent in zip(values.tolist(), latents.tolist())
            if value > 0
        ] or ["<td colspan='2'>no latent fires</td>"]
        token_text = html.escape(pair.tokenizer.decode([token]))
        rows += [f"<tr><td>{token_text if i == 0 else ''}</td>{cell}</tr>" for i, cell in enumerate(cells)]
    return f"<table><tr><th>token</th><th>latent</th><th>activation</th>{header}</tr>" + "".join(rows) + "</table>"

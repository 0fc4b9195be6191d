"""Which per-latent difference score ranks the model organism's planted latents at the top?

For the organism (OrganismConfig, one per seed), a store collected from its corpus, and a ReLU and a
BatchTopK crosscoder trained on it, on the store's held-out (val) split in normalised units:

* per planted behaviour (analysis.planted.behaviour_labels: each chat-template token in its role, the trigger), the
  latent whose firing has the best F1 against the behaviour's tokens (analysis.best_latents),
  its relative decoder norm and decoder cosine, and its rank among the live latents under each candidate
  score; also its rank counting only unplanted latents, those firing mostly (precision < 0.5) off the
  planted tokens (every token of a chat document, the trigger and the count-down), since many latents
  besides the best ones are planted too;
* per score, how many of its top 20 latents are planted (precision >= 0.5 on the planted tokens), and how
  many behaviours have their best latent there with F1 >= 0.5;
* how narrow the fine-tune is: the mean next-token KL(ft ‖ base) and the relative drift
  Σ‖h_ft − h_base‖² / Σ‖h_base‖² at the collected site, on the organism's held-out stories, chat transcripts,
  and trigger stories (the trigger with its count-down apart from the other tokens), BOS excluded;
* with --one-change, the same for a pair with a single change: the base organism fine-tuned so that " ball"
  is followed by " kite" (held to the base elsewhere), collected on plain stories; every " ball" is its one
  behaviour and its planted tokens.

Candidate scores (SCORES; higher = more changed), for latent i with activation f_i(t), decoder vectors
d_base, d_ft, Δd = d_ft − d_base, paired activations x(t), Δx = x_ft − x_base, and KL_t the next-token
KL(ft ‖ base) at token t (analysis.token_divergence):

  kl_mean          Σ_t f_i KL_t / Σ_t f_i: the library's difference_score (analysis.difference_table)
  kl_mean_min10    kl_mean, 0 for latents firing on fewer than 10 val tokens
  kl_share         Σ_t f_i KL_t / Σ_t KL_t
  kl_x_1mcos       kl_mean · (1 − cos(d_base, d_ft))
  delta_x_kl       max(0, delta_explained) · kl_mean
  delta_proj       Σ_t f_i ⟨Δd, Δx⟩ / Σ_t ‖Δx‖²           (the part of Δx the latent writes)
  delta_proj_pos   Σ_t max(0, f_i ⟨Δd, Δx⟩) / Σ_t ‖Δx‖²
  delta_explained  Σ_t (2 f_i ⟨Δd, Δx⟩ − f_i² ‖Δd‖²) / Σ_t ‖Δx‖²   (drop in ‖Δx − f_i Δd‖² from Δd)
  delta_per_token  Σ_t f_i ⟨Δd, Δx⟩ / (#{t: f_i > 0} · mean_t ‖x(t)‖²)
  dec_change       mean_t f_i · ‖Δd‖
  one_minus_cos    1 − cos(d_base, d_ft)
  rel_norm_dist    |relative decoder norm − 0.5|

Run from the repository root:
  .venv/bin/python bench/bench_difference_ranking.py --seeds 0 1 2 --one-change          # default settings
  .venv/bin/python bench/bench_difference_ranking.py --seeds 0 1 2 --one-change --small  # organism.TINY
  .venv/bin/python bench/bench_difference_ranking.py --seeds 0 --tag _broad \\
      --organism '{"finetune_lr": 0.003, "kl_to_base": 0.0}'  # a fine-tune not held to the base
  add --table to only print the markdown tables of the saved results.
Writes outputs/difference_ranking/<default|small><tag>/results.json, with each seed's organism, stores and
crosscoders beside it (reused when run again), and prints each run's ranks as it goes.

Time (2 shared CPU cores, one thread): --small about 30 s per seed (organism 7 s, drift, collection and KL
2 s, training the two crosscoders 4 s and 9 s); --one-change adds a fine-tune, a collection
and two more crosscoders. The default settings take about 9 min per seed with --one-change (organism
build ~2 min).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from crosscoder_utils import (
    ActivationStore,
    CollectConfig,
    CrossCoder,
    CrossCoderConfig,
    OrganismConfig,
    TrainConfig,
    collect_activations,
    estimate_norm_factors,
    load_model_pair,
    train_crosscoder,
)
from crosscoder_utils import analysis as A
from crosscoder_utils.analysis.planted import behaviour_labels
from crosscoder_utils.collect import TracedPair, tokenize
from crosscoder_utils.models import ModelPair
from crosscoder_utils.normalize import load_norm_factors
from crosscoder_utils.organism import (
    CONTINUATION,
    TINY,
    TRIGGER,
    base_corpus,
    build_organism,
    documents,
    pack,
    train_lm,
)

torch.set_num_threads(1)

SETTINGS = {
    "default": dict(
        organism={},
        collect={},
        train=dict(tokens_per_step=1024, train_tokens=2_000_000),
        crosscoder=dict(dict_size=1024, dead_tokens=200_000),
    ),
    "small": dict(
        organism=TINY,
        collect=dict(layer=1, n_tokens=40_000, seq_len=48, val_fraction=0.1),
        train=dict(tokens_per_step=512, train_tokens=400_000),
        crosscoder=dict(dict_size=256, dead_tokens=50_000),
    ),
}
VARIANTS = {"relu": dict(variant="relu"), "batchtopk": dict(variant="batchtopk", k=16)}

# Each score: (sums from latent_sums, the difference table) -> float [dict_size]. See the module docstring.
SCORES = {
    "kl_mean": lambda s, t: t.difference_score.double(),
    "kl_mean_min10": lambda s, t: torch.where(s["fired"] >= 10, t.difference_score.double(), 0.0),
    "kl_share": lambda s, t: t.difference_score.double() * s["f"] / s["kl"],
    "kl_x_1mcos": lambda s, t: t.difference_score * (1 - t.decoder_cosine),
    "delta_x_kl": lambda s, t: (s["explained"] / s["dx_sq"]).clamp(min=0) * t.difference_score,
    "delta_proj": lambda s, t: s["proj"] / s["dx_sq"],
    "delta_proj_pos": lambda s, t: s["proj_pos"] / s["dx_sq"],
    "delta_explained": lambda s, t: s["explained"] / s["dx_sq"],
    "delta_per_token": lambda s, t: s["proj"] / s["fired"].clamp(min=1) / (s["x_sq"] / s["n"]),
    "dec_change": lambda s, t: s["f"] / s["n"] * s["delta_norm"],
    "one_minus_cos": lambda s, t: 1 - t.decoder_cosine,
    "rel_norm_dist": lambda s, t: (t.relative_norm - 0.5).abs(),
}
TABLE_SCORES = ("one_minus_cos", "dec_change", "delta_proj", "delta_per_token", "kl_mean", "kl_mean_min10")
TABLE_SCORES += ("kl_x_1mcos", "kl_share")
N_TOP, MATCH_F1 = 20, 0.5


# ---------------------------------------------------------------- how narrow the fine-tune is
@torch.no_grad()
def finetune_drift(pair: ModelPair, cfg: OrganismConfig, site: str, layer: int, seqs_per_batch: int = 64) -> dict:
    """Per group of the organism's held-out tokens (BOS excluded): mean next-token KL(ft ‖ base), and the
    relative drift Σ‖h_ft − h_base‖² / Σ‖h_base‖² of the activation at the site, and the token count."""
    traced = TracedPair(pair, site, layer)
    texts = documents(cfg, pair.tokenizer)
    pattern = torch.tensor(pair.tokenizer("." + TRIGGER + CONTINUATION)["input_ids"][1:-1])
    sums = {}  # group -> [Σ KL, Σ ‖Δh‖², Σ ‖h_base‖², tokens]
    for kind in ("stories", "chat", "trigger"):
        sequences = list(tokenize(texts[f"eval_{kind}"], pair.tokenizer, None))
        for start in range(0, len(sequences), seqs_per_batch):
            ids, mask, pos = traced.pad(sequences[start : start + seqs_per_batch])
            h = traced.activations(ids, mask, pos).float()  # [batch, seq, 2, d]
            logp = [F.log_softmax(traced.logits(m, ids, mask, pos).float(), -1) for m in (0, 1)]
            kl = (logp[1].exp() * (logp[1] - logp[0])).sum(-1)
            keep = mask.bool() & (pos > 0)
            starts = (ids.unfold(1, len(pattern), 1) == pattern).all(-1)  # [batch, seq - len + 1]
            planted = torch.zeros_like(keep)
            for offset in range(len(pattern)):
                planted[:, offset : offset + starts.shape[1]] |= starts
            groups = {kind: keep}
            if kind == "trigger":
                groups = {"trigger docs, other tokens": keep & ~planted, "trigger + count-down": keep & planted}
            for name, tokens in groups.items():
                base, finetuned = h[tokens][:, 0], h[tokens][:, 1]
                values = [kl[tokens].sum(), (finetuned - base).pow(2).sum(), base.pow(2).sum(), tokens.sum().float()]
                values = torch.stack(values).double()
                sums[name] = sums.get(name, 0) + values
    return {
        name: {"kl": float(kl / n), "drift": float(d / norm), "tokens": int(n)}
        for name, (kl, d, norm, n) in sums.items()
    }


# ---------------------------------------------------------------- scores and ranks
@torch.no_grad()
@torch.no_grad()
def latent_sums(cc: CrossCoder, store, factors, planted: torch.Tensor) -> dict:
    """One pass over the val split: the per-latent sums the scores need (float64 [dict_size]), the global
    sums, and how often each latent fires on ``planted`` tokens (bool [len(store)])."""
    delta = cc.W_dec[:, 1] - cc.W_dec[:, 0]  # [dict_size, d] Δd
    delta_sq = delta.pow(2).sum(-1).double()
    s = dict.fromkeys(("fired", "f", "proj", "proj_pos", "explained", "fired_planted", "dx_sq", "x_sq", "n"), 0.0)
    span = store.split_range("val")
    for start in range(span.start, span.stop, 4096):
        rows = np.arange(start, min(start + 4096, span.stop))
        x = store.read(rows) * factors[None, :, None]
        f = cc.encode(x).double()
        fired = (f > 0).double()
        dx = x[:, 1] - x[:, 0]
        fp = f * (dx @ delta.T).double()  # f_i ⟨Δd_i, Δx(t)⟩
        s["fired"] += fired.sum(0)
        s["f"] += f.sum(0)
        s["proj"] += fp.sum(0)
        s["proj_pos"] += fp.clamp(min=0).sum(0)
        s["explained"] += (2 * fp - f.pow(2) * delta_sq).sum(0)
        s["fired_planted"] += fired[planted[rows]].sum(0)
        s["dx_sq"] += float(dx.double().pow(2).sum())
        s["x_sq"] += float(x.double().pow(2).sum())
        s["n"] += len(f)
    s["delta_norm"] = delta_sq.sqrt()
    return s


def rank(order: torch.Tensor, latent: int, counted: torch.Tensor | None = None) -> int | None:
    """1-based rank of ``latent`` in ``order`` (None if absent), counting only the latents ``counted``
    (bool [dict_size]) ahead of it when given."""
    found = (order == latent).nonzero()
    if not len(found):
        return None
    ahead = order[: int(found[0, 0])]
    return 1 + (len(ahead) if counted is None else int(counted[ahead].sum()))


def quantiles(v: torch.Tensor) -> list[float]:
    """5 %, 50 %, 95 % quantiles (empty: [])."""
    return [round(float(q), 3) for q in v.float().quantile(torch.tensor([0.05, 0.5, 0.95]))] if len(v) else []


def evaluate(cc, store, divergence: A.TokenDivergence, behaviours: dict, planted: torch.Tensor) -> dict:
    """The report of one crosscoder: per behaviour its best latent and that latent's ranks; per score the
    planted latents and found behaviours in its top N_TOP; decoder statistics of planted / unplanted latents."""
    factors = load_norm_factors(store)
    encoded = A.encode(cc, store, factors)
    table = A.difference_table(cc, encoded, divergence)
    matches = {b: m for b, m in A.best_latents(encoded, behaviours).items() if m.n_tokens > 0}
    s = latent_sums(cc, store, factors, planted)
    s["kl"] = float(divergence.kl.double().sum())
    live = table.frequency > 0
    on_planted = live & (s["fired_planted"] / s["fired"].clamp(min=1) >= 0.5)
    orders = {}
    for name, score in SCORES.items():
        values = score(s, table)
        orders[name] = table.order[values[table.order].argsort(descending=True)]
    found = [m.latent for m in matches.values() if m.f1 >= MATCH_F1]
    report = {
        "n_live": int(live.sum()),
        "n_live_planted": int(on_planted.sum()),
        "behaviours": {
            b: {
                "latent": m.latent,
                "f1": m.f1,
                "precision": m.precision,
                "recall": m.recall,
                "n_label": m.n_tokens,
                "rel_norm": float(table.relative_norm[m.latent]),
                "cos": float(table.decoder_cosine[m.latent]),
                "freq": float(table.frequency[m.latent]),
                "rank": {name: rank(o, m.latent) for name, o in orders.items()},
                "rank_among_unplanted": {name: rank(o, m.latent, ~on_planted) for name, o in orders.items()},
            }
            for b, m in matches.items()
        },
        f"top{N_TOP}_planted": {name: int(on_planted[o[:N_TOP]].sum()) for name, o in orders.items()},
        f"top{N_TOP}_found": {name: sum(i in o[:N_TOP].tolist() for i in found) for name, o in orders.items()},
    }
    for key, values in (("cos", table.decoder_cosine), ("rel", table.relative_norm)):
        report[f"live_{key}_quantiles"] = {
            "planted": quantiles(values[on_planted]),
            "unplanted": quantiles(values[live & ~on_planted]),
        }
    return report


# ---------------------------------------------------------------- the pipeline
def collect(pair: ModelPair, corpus: str, store_dir: Path, fields: dict) -> ActivationStore:
    cfg = CollectConfig(base_model=pair.names[0], finetuned_model=pair.names[1], dataset=corpus, **fields)
    store = collect_activations(cfg, store_dir, pair)
    if store.read_json("norm.json") is None:
        estimate_norm_factors(store)
    return store


def crosscoder(store: ActivationStore, run_dir: Path, setting: dict, fields: dict, seed: int) -> CrossCoder:
    if (run_dir / "crosscoder.safetensors").exists():
        return CrossCoder.load(run_dir)
    train = TrainConfig(log_to="none", log_every=10_000, seed=seed, resume=True, **setting["train"])
    return train_crosscoder(train, store, run_dir, CrossCoderConfig(**setting["crosscoder"], **fields))


def one_change_pair(pair: ModelPair, cfg: OrganismConfig, out: Path, steps: int = 60, lr: float = 1e-3):
    """The base organism fine-tuned so that " ball" is followed by " kite" (stories rewritten so), with
    KL-to-base on plain stories; and a corpus of plain stories. Returns (model dir, corpus dir, token id)."""
    ft_dir, corpus_dir = out / "finetuned", out / "corpus"
    ball = pair.tokenizer(" ball")["input_ids"]
    assert len(ball) == 1, ball
    if not (corpus_dir / "dataset_info.json").exists():
        finetuned = copy.deepcopy(pair.base).requires_grad_(True)
        stories = base_corpus(cfg.n_docs, cfg.seed + 11)
        changed = [story.replace(" ball", " ball kite") for story in stories if " ball" in story]
        parts = [pack(stories, pair.tokenizer, cfg.seq_len), pack(changed, pair.tokenizer, cfg.seq_len)]
        torch.manual_seed(cfg.seed)
        train_lm(finetuned, parts, steps, cfg, "one change", lr=lr, reference=pair.base, kl_to_reference=1.0)
        finetuned.save_pretrained(ft_dir)
        pair.tokenizer.save_pretrained(ft_dir)
        texts = base_corpus(cfg.n_docs, cfg.seed + 13)
        datasets.Dataset.from_dict({"text": texts, "kind": ["story"] * len(texts)}).save_to_disk(str(corpus_dir))
    return str(ft_dir), str(corpus_dir), ball[0]


def run_seed(seed: int, out: Path, setting: dict, organism_fields: dict, one_change: bool) -> dict:
    clock, seconds = time.perf_counter, {}
    start = clock()
    cfg = OrganismConfig(out_dir=str(out / "organism"), seed=seed, **{**setting["organism"], **organism_fields})
    organism = build_organism(cfg)
    pair = load_model_pair(organism.base, organism.finetuned)
    seconds["build"] = clock() - start
    collect_cfg = CollectConfig(**setting["collect"])
    drift = finetune_drift(pair, cfg, collect_cfg.site, collect_cfg.layer)
    seconds["drift"] = clock() - start - sum(seconds.values())
    store = collect(pair, organism.corpus, out / "store", setting["collect"])
    behaviours = behaviour_labels(store, organism)
    kinds = np.array(datasets.load_from_disk(organism.corpus)["kind"])
    chat = torch.from_numpy(kinds[store.positions(np.arange(len(store)))[0].numpy()] == "chat")
    sequence = behaviours["trigger"].clone()  # the trigger and the count-down after it
    for offset in range(1, len(organism.planted["behaviours"]["trigger"]["pattern"])):
        sequence[offset:] |= behaviours["trigger"][:-offset]
    pairs = {"organism": (pair, store, behaviours, chat | sequence)}
    if one_change:
        ft_dir, corpus_dir, ball = one_change_pair(pair, cfg, out / "one_change")
        one_pair = load_model_pair(organism.base, ft_dir)
        one_store = collect(one_pair, corpus_dir, out / "one_change/store", setting["collect"])
        label = one_store.token_ids(np.arange(len(one_store))) == ball
        pairs["one_change"] = (one_pair, one_store, {" ball": label}, label)
    seconds["collect"] = clock() - start - sum(seconds.values())
    entry = {"losses": organism.losses, "kl": organism.kl, "drift": drift, "seconds": seconds}
    for pair_name, (p, store, labels, planted) in pairs.items():
        t = clock()
        divergence = A.token_divergence(p, store, load_norm_factors(store))
        seconds[f"{pair_name} KL"] = clock() - t
        for variant, fields in VARIANTS.items():
            t = clock()
            cc = crosscoder(store, out / f"runs/{pair_name}-{variant}", setting, fields, seed)
            seconds_train = clock() - t
            report = {**evaluate(cc, store, divergence, labels, planted), "seconds_train": seconds_train}
            entry[f"{pair_name}/{variant}"] = report
            print_report(f"seed {seed} {pair_name} {variant}", report)
    seconds["total"] = clock() - start
    print(f"seed {seed}: losses {organism.losses}\n drift {json.dumps(drift)}\n seconds {seconds}", flush=True)
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--small", action="store_true", help="organism.TINY, small collection and training")
    parser.add_argument("--organism", type=json.loads, default={}, help="OrganismConfig fields to override (JSON)")
    parser.add_argument("--tag", default="", help="suffix of the output directory")
    parser.add_argument("--one-change", action="store_true", help="also the one-change pair")
    parser.add_argument("--out", default="outputs/difference_ranking")
    parser.add_argument("--table", action="store_true", help="only print markdown tables of the saved results")
    args = parser.parse_args()
    name = "small" if args.small else "default"
    out = Path(args.out) / (name + args.tag)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.table:
        return print_tables(results)
    for seed in args.seeds:
        results[str(seed)] = run_seed(seed, out / f"seed{seed}", SETTINGS[name], args.organism, args.one_change)
        results_path.write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------- printing
def print_report(title: str, report: dict):
    print(
        f"=== {title}: {report['n_live']} live latents ({report['n_live_planted']} planted); "
        f"top-{N_TOP} planted {report[f'top{N_TOP}_planted']}; top-{N_TOP} found {report[f'top{N_TOP}_found']}"
    )
    for b, r in report["behaviours"].items():
        ranks = " ".join(f"{k}={v}/{r['rank_among_unplanted'][k]}" for k, v in r["rank"].items())
        print(
            f"  {b:>14}: F1 {r['f1']:.2f} (P {r['precision']:.2f} R {r['recall']:.2f}) rel {r['rel_norm']:.2f} "
            f"cos {r['cos']:.2f} | {ranks}",
            flush=True,
        )


def print_tables(results: dict, scores=TABLE_SCORES):
    """Markdown: the fine-tune's narrowness per seed; per pair and variant, per seed and behaviour, the best
    latent's F1, relative norm, cosine and rank / rank among unplanted latents under each score; then per
    seed the planted latents and found behaviours in each score's top N_TOP."""
    print("| seed | tokens | KL(ft ‖ base) | drift | n |\n|---|---|---|---|---|")
    for seed, entry in results.items():
        for group, d in entry["drift"].items():
            print(f"| {seed} | {group} | {d['kl']:.4f} | {d['drift']:.4f} | {d['tokens']} |")
    for key in sorted({k for entry in results.values() for k in entry if "/" in k}):
        runs = {seed: entry[key] for seed, entry in results.items() if key in entry}
        print(f"\n#### {key}\n")
        print("| seed | behaviour | F1 | rel | cos | " + " | ".join(scores) + " |")
        print("|---" * (5 + len(scores)) + "|")
        for seed, e in runs.items():
            for b, r in e["behaviours"].items():
                cells = [f"{r['rank'][s]}/{r['rank_among_unplanted'][s]}" for s in scores]
                print(
                    f"| {seed} | {b} | {r['f1']:.2f} | {r['rel_norm']:.2f} | {r['cos']:.2f} | "
                    + " | ".join(cells)
                    + " |"
                )
        print("\n| seed | live (planted) | " + " | ".join(f"top-{N_TOP} planted / found: {s}" for s in scores) + " |")
        print("|---" * (2 + len(scores)) + "|")
        for seed, e in runs.items():
            cells = [f"{e[f'top{N_TOP}_planted'][s]} / {e[f'top{N_TOP}_found'][s]}" for s in scores]
            print(f"| {seed} | {e['n_live']} ({e['n_live_planted']}) | " + " | ".join(cells) + " |")
        for seed, e in runs.items():
            print(
                f"seed {seed} cos quantiles (5/50/95 %) {e['live_cos_quantiles']}, "
                f"relative norm {e['live_rel_quantiles']}"
            )


if __name__ == "__main__":
    main()

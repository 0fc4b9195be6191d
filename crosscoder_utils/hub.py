"""The Hub: a run's model card, and pushing a crosscoder (with its card) or a store. Reading back is where the
objects are read: ``CrossCoder.load`` and ``ActivationStore`` open Hub ids and ``hf://`` URLs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fsspec
import yaml

from .config import explained_variance_metric, model_roles
from .crosscoder import CrossCoder
from .files import resolve
from .notebook import progress
from .run import Run
from .store import ActivationStore


def model_card(run: Run, repo_id: str) -> str:
    """README.md for the run's raw crosscoder on the Hub: YAML metadata (tags; the models as ``base_model`` and
    the dataset, when they are Hub ids) and what a reader needs to use it: models and revisions, site and
    layer, data, tokens, the dictionary, final metrics, and how to load it."""
    meta, cc, last = run.store.meta, run.crosscoder.cfg, run.metrics[-1]
    dataset = meta.get("dataset") or {}
    # Hub ids only: not on disk as given, nor under the repository (where notebooks record relative paths from)
    hub = lambda names: [n for n in names if n and not any(Path(p).expanduser().exists() for p in (n, resolve(n)))]
    front = {
        "library_name": "crosscoder_utils",
        "tags": ["crosscoder", "model-diffing", "sparse-autoencoder", "interpretability"],
        "base_model": hub(meta["models"]) if run.store.collected_from_models else None,
        "datasets": hub([dataset.get("name")]),
        "crosscoder": {  # what CrossCoder.load reads into ``provenance``
            "models": meta["models"],
            "revisions": meta.get("revisions"),
            "site": meta.get("site"),
            "layer": meta.get("layer"),
            "d_model": meta["d_model"],
            "units": "raw",
        },
    }
    front = {key: value for key, value in front.items() if value}
    roles = model_roles(cc.n_models)
    per_model = ", ".join(
        f"`{explained_variance_metric(m)}` ({role}) {last[explained_variance_metric(m)]:.4f}"
        for m, role in enumerate(roles)
    )
    tanh = "" if cc.tanh_scale is None else f", tanh penalty c {cc.tanh_scale}"
    sparsity = f"k {cc.k}" if cc.variant == "batchtopk" else f"λ {cc.l1_coeff}{tanh}"
    rows = {
        "models": ", ".join(f"{role}: `{name}`" for role, name in zip(roles, meta["models"])),
        "revisions": ", ".join(str(r) for r in meta.get("revisions", [None] * cc.n_models)),
        "site": f"{meta.get('site')}, layer {meta.get('layer')} (d_model {meta['d_model']})",
        "data": f"`{dataset.get('name')}` (split {dataset.get('split')}, column {dataset.get('text_column')})",
        "store": f"{meta['n_tokens']:,} tokens; BOS and other exclusions: {meta.get('exclusions')}",
        "training": f"{run.cfg.train_tokens:,} tokens, {run.cfg.tokens_per_step} per step, seed {run.cfg.seed}",
        "dictionary": f"{cc.variant}, {cc.dict_size} latents, {sparsity}",
        "final metrics": (
            f"step {last['step']}: `explained_variance` {last['explained_variance']:.4f} ({per_model}); "
            f"`l0_loss` {last['l0_loss']:.1f}; `loss` {last['loss']:.4g} (`l2_loss` {last['l2_loss']:.4g}); "
            f"`dead_fraction` {last['dead_fraction']:.1%}"
        ),
        "units": "raw activations (the norm factors are folded into the weights)",
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items())
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# {cc.variant} crosscoder: {' vs '.join(meta['models'])}\n\n"
        "A crosscoder trained with crosscoder_utils: one latent dictionary read from and decoded into each "
        "model's activations at the site below (model 0 is the base).\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        "```python\nfrom crosscoder_utils import CrossCoder\n\n"
        f'cc = CrossCoder.load("{repo_id}")\n'
        "f = cc.encode(x)  # x: [tokens, n_models, d_model], each model's raw activation at the site\n```\n"
    )


def push_crosscoder(
    cc: CrossCoder, repo_id: str, card: str | None = None, private: bool | None = None, token: str | None = None
) -> str:
    """Upload what ``CrossCoder.save`` writes to a Hub model repo, with ``card`` (``model_card``) as its
    README.md; ``CrossCoder.load(repo_id)`` reads it back."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        cc.save(directory)
        if card:
            Path(directory, "README.md").write_text(card)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=directory,
            commit_message=f"{cc.cfg.variant} crosscoder, {cc.cfg.dict_size} latents",
        )
    return repo_id


def push_store(
    store: ActivationStore,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    shards_per_commit: int = 50,
) -> str:
    """Upload a local, complete store to a Hub dataset repo; returns the URL that opens it,
    ``hf://datasets/<repo_id>``.

    Shards go up ``shards_per_commit`` to a commit, those already there are skipped, and meta.json
    (listing the shards, with norm.json) comes last: an interrupted push resumes where it stopped, and
    the repo opens as a store only once it is whole. A repo that holds another store is refused.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if store.remote:
        raise ValueError(f"push_store uploads a local store; {store.path} is not one (copy it locally first)")
    api, url = HfApi(token=token), f"hf://datasets/{repo_id}"
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    files = set(api.list_repo_files(repo_id, repo_type="dataset"))
    if "progress.json" in files:
        theirs = json.loads(fsspec.filesystem("hf", token=token).cat_file(f"datasets/{repo_id}/progress.json"))
        if theirs["settings"] != store.meta["settings"]:
            raise ValueError(f"{url} holds another store (other collection settings); push to a new repo")
    todo = [name for name in store.shard_names if f"shards/{name}/state.json" not in files]
    for first in progress(range(0, len(todo), shards_per_commit), desc="push shards", unit="commit"):
        names = todo[first : first + shards_per_commit]
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=store.path,
            allow_patterns=["progress.json"] + [f"shards/{name}/*" for name in names],
            commit_message=f"shards {names[0]} to {names[-1]}",
        )
    last = [CommitOperationAdd("meta.json", json.dumps(store.meta, indent=2).encode())]  # lists the shards
    norm = Path(store.path) / "norm.json"
    if norm.exists():
        last.append(CommitOperationAdd("norm.json", str(norm)))
    api.create_commit(repo_id, last, repo_type="dataset", commit_message="meta.json: the store is complete")
    return url

"""The run directory: what a training run writes, checks before writing, and how it is read back.

A run directory holds::

    run.json                     the TrainConfig and CrossCoderConfig of the run, and the store it reads
    metrics.jsonl                one line of metrics every log_every steps (``train.step_metrics``: loss,
                                 l2_loss, l1_loss, l0_loss, l1_coeff, lr, explained_variance,
                                 explained_variance_A (the base), explained_variance_B ..., and the extras)
    checkpoints/step_XXXXXXX/    the latest checkpoint: crosscoder.safetensors (weights, threshold, dead
                                 counts) + cfg.json, optimizer.pt and state.pt (loaded with weights_only=True)
    crosscoder.safetensors       the final export (normalised space) + cfg.json + norm_factors.json
    raw/                         the same crosscoder with the norm factors folded in: reads raw activations
    timing.json                  the wall-clock seconds of the training loop and the steps they cover (a
                                 resumed run times its last part only)
    health.json                  the dictionary's health on held-out tokens (analysis.health)

``train.py`` writes it; analysis, the dashboard and hub.py read it through ``load_run``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from . import distributed
from .config import CrossCoderConfig, TrainConfig, explained_variance_metric, model_roles
from .crosscoder import CrossCoder, finite
from .files import (
    check_same_settings,
    parse_json,
    portable,
    read_json,
    refuse_if_held,
    resolve,
    take_lock,
    write_json,
)
from .models import resolve_device
from .normalize import load_norm_factors
from .source import ModelSource
from .store import ActivationStore


def finished(run_dir: str | Path, overwrite: bool = False) -> bool:
    """Whether ``run_dir`` holds a finished run that training reads back rather than trains again (it still
    checks the settings match: ``prepare_run``)."""
    return (Path(run_dir).expanduser() / "crosscoder.safetensors").exists() and not overwrite


def store_identity(store: ActivationStore) -> dict:
    """What a run records of its store (and of how it is shuffled), to refuse resuming on another one."""
    keys = ("models", "site", "layer", "d_model", "n_models", "n_tokens", "dtype", "val_fraction", "settings")
    return {**{k: store.meta.get(k) for k in keys}, "window_rows": store.window_rows}


def save_checkpoint(run_dir: Path, crosscoder: CrossCoder, optimizer, scheduler, step: int, keep: int = 2) -> None:
    """Write checkpoints/step_N atomically (a temporary folder renamed) and read its weights back; only then
    drop the checkpoints older than the ``keep`` newest, so a damaged newest one still has one before it."""
    checkpoints = run_dir / "checkpoints"
    tmp = checkpoints / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    crosscoder.save(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(
        {"step": step, "torch_rng": torch.get_rng_state(), "sparse_path": crosscoder.sparse_path}, tmp / "state.pt"
    )
    written = load_file(tmp / "crosscoder.safetensors")
    if any(not torch.equal(written[k], v.cpu()) for k, v in crosscoder.state_dict().items()):
        raise OSError(
            f"{tmp / 'crosscoder.safetensors'} does not read back as written; the checkpoints before it are kept"
        )
    shutil.rmtree(checkpoints / f"step_{step:07d}", ignore_errors=True)  # a damaged one a resume skipped
    os.replace(tmp, checkpoints / f"step_{step:07d}")
    for old in sorted(checkpoints.glob("step_*"))[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(run_dir: Path, crosscoder: CrossCoder, optimizer, scheduler, device: str) -> int:
    """Load the newest readable checkpoint into the crosscoder, optimizer and scheduler, and the RNG state; returns
    its step (0 when there is none). A damaged checkpoint is skipped with a warning naming it."""
    for checkpoint in sorted((run_dir / "checkpoints").glob("step_*"), reverse=True):
        try:
            weights = load_file(checkpoint / "crosscoder.safetensors", device=str(device))
            states = torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location=device)
            state = torch.load(checkpoint / "state.pt", weights_only=True)
            if not finite(weights):
                raise ValueError("non-finite weights")
            crosscoder.load_state_dict(weights)
        except Exception as error:  # a truncated or damaged file: fall back to the checkpoint before it
            warnings.warn(f"checkpoint {checkpoint} cannot be used ({error}); trying the one before it", stacklevel=3)
            continue
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        crosscoder.sparse_path = state["sparse_path"]  # the path the run took, whatever auto would measure now
        return state["step"]
    return 0


def prepare_run(
    cfg: TrainConfig,
    cc_cfg: CrossCoderConfig,
    store: ActivationStore | ModelSource,
    run_dir: Path,
    factors: torch.Tensor,
) -> tuple[CrossCoderConfig, dict]:
    """Fill the crosscoder's shape from the source and check the run against it and ``run_dir`` before
    anything is written: returns the config and the identity run.json records (``write_run``)."""
    refuse_if_held(run_dir / "train.lock")  # another process trains this run; taken once every check has passed
    if (
        isinstance(store, ActivationStore)
        and not store.remote
        and Path(store.path).resolve().is_relative_to(run_dir.resolve())
    ):
        raise ValueError(f"run_dir {run_dir} holds the store it trains on ({store.path}): give the run its own folder")
    if cfg.overwrite and run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "run.json").exists():
        raise ValueError(
            f"overwrite=True deletes run_dir, and {run_dir} holds files but no run (no run.json): give a run's "
            "folder or a new one"
        )
    for name in ("d_model", "n_models"):
        given = getattr(cc_cfg, name)
        if given is not None and given != store.meta[name]:
            raise ValueError(f"CrossCoderConfig.{name}={given} but the activations have {name}={store.meta[name]}")
    cc_cfg = dataclasses.replace(cc_cfg, d_model=store.d_model, n_models=store.n_models)  # __post_init__ fills k_aux
    train_rows = len(store.split_range("train"))
    if store.n_batches(cfg.tokens_per_step) == 0:
        raise ValueError(
            f"the training rows ({train_rows} tokens) are fewer than one step ({cfg.tokens_per_step} tokens)"
        )
    if cfg.init == "data" and train_rows < cc_cfg.dict_size:
        raise ValueError(
            f"init='data' starts each of the {cc_cfg.dict_size} latents from a sampled token, but the training "
            f"rows are {train_rows}; collect more tokens, lower dict_size, or use init='random'"
        )
    identity = {
        "train": cfg.settings(),
        "crosscoder": cc_cfg.settings(),
        **(
            {"store_identity": store_identity(store)}
            if isinstance(store, ActivationStore)
            else {"source": store.identity()}
        ),
        "norm_factors": factors.tolist(),
    }
    if (run_dir / "run.json").exists() and not cfg.overwrite:
        before = read_json(run_dir / "run.json")
        check_same_settings(
            run_dir,
            "a run",
            {k: before.get(k) for k in identity},
            identity,
            "use another run_dir, or overwrite=True to delete it and train again",
        )
        if not cfg.resume and not finished(run_dir):
            raise ValueError(
                f"{run_dir} holds an unfinished run with these settings; pass resume=True to continue it, or "
                "overwrite=True to start again"
            )
    return cc_cfg, identity


def write_run(run_dir: Path, identity: dict, store: ActivationStore) -> str:
    """run.json: what the run is and the store 04 reads (its own, or the held-out store of a run trained from
    the models), written once every check has passed (every rank has checked first). Returns the run's
    wandb id: new for a new run (unique, so that two runs with the same folder name never merge), kept from
    run.json on a resume."""
    distributed.barrier()
    record = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    wandb_id = record.get("wandb_id") or uuid.uuid4().hex[:16]
    if distributed.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        take_lock(run_dir / "train.lock")  # released after the export: one trainer per run_dir
        record = {**identity, "store": portable(store.path), "store_identity": store_identity(store)}
        write_json(run_dir / "run.json", {**record, "wandb_id": wandb_id})
    return wandb_id


class MetricsLog:
    """Rank 0's metrics: metrics.jsonl (one line every ``log_every`` steps) and the wandb run; on other ranks
    it writes nothing. A resume keeps the lines up to its checkpoint (a line a kill cut short is dropped with
    the steps after it)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, cc_cfg: CrossCoderConfig, store, wandb_id: str, start: int):
        self.path, self.run, self.active = run_dir / "metrics.jsonl", None, distributed.rank() == 0
        if not self.active:
            return
        lines = self.path.read_text().splitlines() if start and self.path.exists() else []
        self.path.write_text("".join(line + "\n" for line in lines if logged_step(line) <= start))
        if cfg.log_to != "none":
            import wandb

            self.run = wandb.init(
                project=cfg.wandb_project,
                dir=str(run_dir),
                mode=cfg.log_to,
                name=run_dir.name,
                config={**cfg.to_dict(), **cc_cfg.to_dict(), "store": portable(store.path), **store_identity(store)},
                resume="allow",
                id=wandb_id,
                settings=wandb.Settings(silent=True),  # its banner and summary would fill the report
            )

    def log(self, metrics: dict) -> None:
        if self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.run:
                self.run.log(metrics, step=metrics["step"])

    def finish(self, cfg: TrainConfig) -> None:
        if self.run:
            self.run.finish()
            print(
                f"wandb ({cfg.log_to}) run {self.run.id} in {self.run.dir}"
                + " (`wandb sync` uploads it)" * (cfg.log_to == "offline")
            )


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def diverged(run_dir: Path, step: int, what: str) -> str:
    """The message of a run stopped at ``step`` because ``what``."""
    kept = sorted((run_dir / "checkpoints").glob("step_*"))
    return (
        f"training diverged: {what} at step {step}; nothing was exported"
        + (f", and the last good checkpoint {kept[-1]} is kept" if kept else "")
        + ". Lower the learning rate or max_grad_norm, or check the store (ActivationStore(path, verify=True))"
    )


def export(crosscoder: CrossCoder, factors: torch.Tensor, run_dir: Path) -> None:
    """The final crosscoder in normalised units (run_dir) and with the factors folded in (run_dir/raw)."""
    crosscoder.save(run_dir)
    write_json(run_dir / "norm_factors.json", {"norm_factors": factors.tolist()})
    crosscoder.fold_norm_factors(factors).save(run_dir / "raw")


class Run(NamedTuple):
    """A finished run as ``load_run`` reads it back."""

    cfg: TrainConfig
    """How it was trained (runtime fields at their defaults)."""
    crosscoder: CrossCoder
    """The crosscoder in normalised units (what was trained)."""
    raw: CrossCoder
    """The same with the norm factors folded in: reads and writes raw activations."""
    store: ActivationStore
    """The store it was trained on."""
    norm_factors: torch.Tensor
    """[n_models] the store's norm factors the run used."""
    metrics: list[dict]
    """One dict per logged step (metrics.jsonl)."""


def load_run(run_dir: str | Path, device: str = "cpu") -> Run:
    """Read back what ``train_crosscoder`` wrote into ``run_dir`` (run.json, the export, metrics.jsonl);
    the crosscoders on ``device`` (``auto``: cuda when available)."""
    run_dir, device = Path(run_dir).expanduser(), resolve_device(device)
    if not finished(run_dir):
        raise FileNotFoundError(f"{run_dir} holds no finished run (no crosscoder.safetensors): train it with 03_train")
    record = read_json(run_dir / "run.json")
    metrics = [
        parse_json(line, run_dir / "metrics.jsonl") for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    factors = torch.tensor(read_json(run_dir / "norm_factors.json")["norm_factors"])
    store = ActivationStore(resolve(record["store"]))
    remedy = f"point {run_dir / 'run.json'}'s store at the store the run was trained on, or train again"
    check_same_settings(store.path, "a store", store_identity(store), record["store_identity"], remedy)
    if store.read_json("norm.json") is None or load_norm_factors(store).tolist() != factors.tolist():
        raise ValueError(
            f"the norm factors of the store at {store.path} are not those {run_dir} was trained with; {remedy}"
        )
    return Run(
        TrainConfig.from_dict(record["train"]),
        CrossCoder.load(run_dir, device),
        CrossCoder.load(run_dir / "raw", device),
        store,
        factors,
        metrics,
    )


def explained_variance_by_model(metrics: dict) -> dict[str, float]:
    """A metrics.jsonl line's per-model explained variance (explained_variance_A, explained_variance_B, ...),
    by role (base, finetuned, ...)."""
    n_models = next(m for m in itertools.count() if explained_variance_metric(m) not in metrics)
    return {role: metrics[explained_variance_metric(m)] for m, role in enumerate(model_roles(n_models))}

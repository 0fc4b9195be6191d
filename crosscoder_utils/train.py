"""The training loop: Adam, LambdaLR, λ warm-up, clipping, init, resampling, metrics, exact resume. What a run
writes into its directory, and how it is read back, is ``run.py``."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .analysis.encoding import encode
from .analysis.health import connected_groups, dictionary_health, same_decoder_pairs
from .config import CollectConfig, CrossCoderConfig, TrainConfig
from .crosscoder import CrossCoder, finite
from .files import write_json
from .normalize import load_norm_factors
from .notebook import progress
from .run import (
    MetricsLog,
    diverged,
    export,
    finished,
    load_checkpoint,
    prepare_run,
    save_checkpoint,
    write_run,
)
from .source import ModelSource
from .store import ActivationStore


def lr_lambda(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up over lr_warmup_frac, constant, linear decay to 0 over the final lr_decay_frac."""
    warmup, decay = cfg.lr_warmup_frac * total_steps, cfg.lr_decay_frac * total_steps
    if step < warmup:
        return (step + 1) / warmup
    if decay > 0 and step >= total_steps - decay:
        return (total_steps - step) / decay
    return 1.0


def l1_coeff_at(step: int, total_steps: int, cfg: TrainConfig, l1_coeff: float) -> float:
    """λ rises linearly from 0 over the first l1_warmup_frac of the steps."""
    warmup = cfg.l1_warmup_frac * total_steps
    return l1_coeff * min(1.0, (step + 1) / warmup) if warmup > 0 else l1_coeff


def k_at(step: int, total_steps: int, cfg: TrainConfig, cc_cfg: CrossCoderConfig) -> int:
    """k falls linearly from k_anneal_factor · k (at most dict_size) to k over the first k_anneal_frac of the
    steps."""
    k, span = cc_cfg.k, cfg.k_anneal_frac * total_steps
    start = min(round(cfg.k_anneal_factor * k), cc_cfg.dict_size)
    return k if step >= span else round(start + (k - start) * step / span)


def training_batches(
    source: ActivationStore | ModelSource, cfg: TrainConfig, start_step: int, process: tuple[int, int] = (0, 1)
) -> Iterator[torch.Tensor]:
    """Batches for steps start_step, start_step + 1, ...: pass e over the source is shuffled with seed + e;
    ``process=(rank, world_size)``: this rank's share of each batch."""
    start_pass, first = pass_and_batch(source, cfg, start_step)
    for epoch in itertools.count(start_pass):
        yield from source.batches(cfg.tokens_per_step, seed=cfg.seed + epoch, start_batch=first, process=process)
        first = 0


def pass_and_batch(source: ActivationStore | ModelSource, cfg: TrainConfig, step: int) -> tuple[int, int]:
    """The pass over the source (0-based) that step ``step`` falls in, and its batch within that pass."""
    return divmod(step, source.n_batches(cfg.tokens_per_step))


def step_rows(store: ActivationStore, cfg: TrainConfig, step: int, process: tuple[int, int]) -> np.ndarray:
    """The store rows of step ``step``'s batch (0-based), as ``training_batches`` reads them."""
    epoch, first = pass_and_batch(store, cfg, step)
    return next(store.batch_rows(cfg.tokens_per_step, cfg.seed + epoch, start_batch=first, process=process))


def not_finite_in_store(store: ActivationStore, row: int, what: str) -> FloatingPointError:
    return FloatingPointError(
        f"{what} holds a value that is not finite, at {store.locate(row)}; nothing was exported. The store"
        " changed after it was collected: ActivationStore(path, verify=True) names the shards that no longer"
        " match their checksums; collect the store again"
    )


def refuse_nonfinite(first_bad: torch.Tensor, source, cfg: TrainConfig, run_dir: Path) -> None:
    """Stop the run if a step's loss was not finite (``first_bad``: the first such step, 0-based, or -1), naming
    the store row that made it so, or the divergence."""
    step = int(first_bad)
    if step < 0:
        return
    process = (distributed.rank(), distributed.world_size())
    from_store = isinstance(source, ActivationStore)
    row = source.first_nonfinite(step_rows(source, cfg, step, process)) if from_store else None
    if row is None:
        raise FloatingPointError(diverged(run_dir, step + 1, "the loss is not finite"))
    raise not_finite_in_store(source, row, f"the training batch of step {step + 1}")


SPARSE_CHOICES: dict[tuple, bool] = {}
"""use_sparse_path's measured choices, per shape and device."""


def use_sparse_path(crosscoder: CrossCoder, cfg: TrainConfig, rows: int, device: str) -> bool:
    """Whether BatchTopK training takes the sparse path: as ``cfg.sparse_path`` says, or with ``auto`` on a CPU
    the sparse path (faster there at every shape measured, and a choice by timing would make CPU runs
    depend on it), on a GPU whichever of the sparse and the dense step (forward and backward, bf16 autocast)
    a one-off micro-benchmark on a batch of ``rows`` random rows measures faster, at the run's mean k (the
    sparse step's cost grows with k, the dense one's does not; k annealing raises k early on); cached per
    shape and device, and every rank takes rank 0's choice."""
    on_cuda = device.startswith("cuda")
    if crosscoder.cfg.variant != "batchtopk" or cfg.sparse_path != "auto" or not on_cuda:
        return cfg.sparse_path != "off"
    c = crosscoder.cfg
    k = round(sum(k_at(step, cfg.total_steps, cfg, c) for step in range(cfg.total_steps)) / cfg.total_steps)
    key = (torch.cuda.get_device_name(device), rows, c.n_models, c.d_model, c.dict_size, k)
    if key not in SPARSE_CHOICES:
        trial = copy.deepcopy(crosscoder)
        x = torch.randn(rows, c.n_models, c.d_model, generator=torch.Generator().manual_seed(0)).to(device)
        seconds = {}
        for sparse in (True, False):
            trial.sparse_path = sparse
            for repeat in range(3):  # the first warms up
                if repeat == 1:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                with torch.autocast("cuda", torch.bfloat16):
                    trial.losses(x, k=k).loss.backward()
            torch.cuda.synchronize()
            seconds[sparse] = time.perf_counter() - start
        choice = torch.tensor(int(seconds[True] <= seconds[False]) * (distributed.rank() == 0), device=device)
        SPARSE_CHOICES[key] = bool(distributed.all_reduce(choice))
    return SPARSE_CHOICES[key]


@torch.no_grad()
def data_init(crosscoder: CrossCoder, x: torch.Tensor) -> None:
    """Decoder vectors from centred activations of tokens distinct in value (each model's half from the same
    token, so a latent starts where real paired activations lie), each scaled to dec_init_norm; the encoder
    is the decoder's transpose; b_dec is the mean activation. x: [>= dict_size, n_models, d_model] normalised.

    A templated corpus repeats activations exactly (a template token after the same prefix): latents started
    from one vector get the same gradients and stay exact duplicates, so each distinct row is used once, and
    latents beyond the distinct rows keep their random initialisation."""
    mean = x.mean(0)
    _, group = torch.unique(x.flatten(1), dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), len(x), device=x.device)
    first = first.scatter_reduce(0, group, torch.arange(len(x), device=x.device), "amin").sort().values
    rows = x[first[: crosscoder.cfg.dict_size]] - mean
    crosscoder.W_dec[: len(rows)] = (
        rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-6) * crosscoder.cfg.dec_init_norm
    )
    crosscoder.W_enc.copy_(rearrange(crosscoder.W_dec, "latent model d -> model d latent"))
    crosscoder.b_dec.copy_(mean)
    crosscoder.apply_partition_()


@torch.no_grad()
def resample_latents(crosscoder: CrossCoder, optimizer: torch.optim.Adam, x: torch.Tensor) -> int:
    """Re-initialise dead and duplicate latents towards badly reconstructed tokens; returns how many.

    Dead: silent for the crosscoder's ``dead_tokens``. Duplicate: in a group of live latents with nearly the
    same decoder (``health.same_decoder_pairs``); the group keeps the latent that writes the most on the batch
    (Σ f · decoder norm). The decoder-norm-weighted L1 costs latents with parallel decoders what one latent
    with their summed activation costs, so nothing in training merges them. Latents that merely fire on the
    same tokens of a batch are not resampled: the organism's behaviour latents do (two latents on every
    `<|end|>`, of different sizes after the user and after the assistant; bench/RESULTS.md).

    After Anthropic's resampling (Towards Monosemanticity, 2023), with one change: a resampled latent's decoder
    takes the direction of a token's *residual* x − x̂ rather than of x itself (what is unexplained, as the
    auxiliary loss also targets), tokens drawn with probability ∝ squared error. All models' parts keep the
    residual's proportions (so a residual living in one model starts an exclusive latent), scaled to the
    norm a random latent starts with; the encoder is the decoder direction at 0.2 × the mean encoder norm of
    the live latents; b_enc and the latents' Adam moments are zeroed. x: [batch, n_models, d_model]."""
    was_training = crosscoder.training
    crosscoder.eval()
    f = crosscoder.encode(x)
    residual = x - crosscoder.decode(f)
    crosscoder.train(was_training)
    dead = crosscoder.dead_latents()
    written = f.sum(0) * crosscoder.decoder_norms().sum(-1)
    for group in connected_groups(same_decoder_pairs(crosscoder.W_dec), ~dead):
        group = torch.tensor(group, device=x.device)
        dead[group[group != group[written[group].argmax()]]] = True
    alive = ~dead
    dead = dead.nonzero().squeeze(1)
    if len(dead) == 0 or len(dead) == crosscoder.cfg.dict_size:
        return 0
    error = residual.pow(2).sum((1, 2))
    rows = torch.multinomial(error / error.sum(), len(dead), replacement=len(dead) > len(x))
    direction = residual[rows].flatten(1)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-12)
    n_models = crosscoder.cfg.n_models
    crosscoder.W_dec[dead] = rearrange(
        direction * crosscoder.cfg.dec_init_norm * n_models**0.5, "latent (model d) -> latent model d", model=n_models
    )
    alive_norm = crosscoder.W_enc.flatten(0, 1)[:, alive].norm(dim=0).mean()
    crosscoder.W_enc[:, :, dead] = rearrange(
        direction * 0.2 * alive_norm, "latent (model d) -> model d latent", model=n_models
    )
    crosscoder.b_enc[dead] = 0
    crosscoder.apply_partition_()
    crosscoder.tokens_since_fired[dead] = 0
    for param, dim in ((crosscoder.W_dec, 0), (crosscoder.W_enc, 2), (crosscoder.b_enc, 0)):
        for moment in optimizer.state[param].values():
            if moment.dim():
                moment.index_fill_(dim, dead, 0)
    return len(dead)


class Objective(nn.Module):
    """The crosscoder's losses as a forward pass, so DistributedDataParallel can wrap them."""

    def __init__(self, crosscoder: CrossCoder):
        super().__init__()
        self.crosscoder = crosscoder

    def forward(self, x: torch.Tensor, l1_coeff: float, k: int):
        return self.crosscoder.losses(x, l1_coeff=l1_coeff, k=k)


def step_metrics(out, step: int, l1_coeff: float, lr: float, crosscoder: CrossCoder, device: str) -> dict:
    """A logged step's metrics: the losses averaged over the ranks (``Losses.metrics``: loss, l2_loss, l1_loss,
    penalty, l0_loss, aux_loss, explained_variance, explained_variance_A, explained_variance_B ...), the
    schedules' values (l1_coeff: λ after its warm-up; lr), the fraction of latents silent for ``dead_tokens``
    (dead_fraction) and, for BatchTopK, the inference threshold."""
    values = out.metrics()
    averaged = distributed.all_reduce(torch.tensor(list(values.values()), device=device)) / distributed.world_size()
    metrics = {
        "step": step,
        **dict(zip(values, averaged.tolist())),
        "l1_coeff": l1_coeff,
        "lr": lr,
        "dead_fraction": crosscoder.dead_latents().float().mean().item(),
    }
    if crosscoder.cfg.variant == "batchtopk":
        metrics["threshold"] = crosscoder.threshold.item()
    return metrics


def initial_crosscoder(
    cfg: TrainConfig, cc_cfg: CrossCoderConfig, source, factors: torch.Tensor, device: str
) -> CrossCoder:
    """The crosscoder before its first step, seeded: random, or (``init="data"``) from a sample of the source,
    refused naming the store row when the sample is not finite."""
    torch.manual_seed(cfg.seed)
    crosscoder = CrossCoder(cc_cfg).to(device).train()
    if cfg.init == "data":
        n_rows = cc_cfg.dict_size + 4096
        sample = source.sample(n_rows, seed=cfg.seed)
        if isinstance(source, ActivationStore) and not torch.isfinite(sample).all():
            rows = source.sample_rows(n_rows, seed=cfg.seed)
            raise not_finite_in_store(source, source.first_nonfinite(rows), "the sample of the data init")
        data_init(crosscoder, (sample * factors[None, :, None]).to(device))
    crosscoder.sparse_path = use_sparse_path(crosscoder, cfg, cfg.tokens_per_step // distributed.world_size(), device)
    return crosscoder


def held_out_store(source, run_dir: Path, factors: torch.Tensor) -> ActivationStore:
    """The store 04 reads: the source itself, or from the models the held-out rows, written by rank 0 to
    ``run_dir/heldout`` and then read by every rank."""
    if isinstance(source, ActivationStore):
        return source
    if distributed.rank() == 0:
        source.write_heldout(run_dir / "heldout", factors)
    distributed.barrier()
    return ActivationStore(run_dir / "heldout")


def train_crosscoder(
    cfg: TrainConfig,
    source: ActivationStore | ModelSource,
    run_dir: str | Path,
    cc_cfg: CrossCoderConfig = CrossCoderConfig(),
) -> CrossCoder:
    """Train a crosscoder on normalised activations, from a store or straight from the models (a
    ``ModelSource``); export it to run_dir and return it.

    The norm factors scale each model's activations to a mean norm of sqrt(d_model): the store's (02_normalize),
    or, from the models, estimated on the first fill and written with the held-out rows to
    ``run_dir/heldout`` (the store 04 reads).
    Under torchrun (N processes) every rank trains on its 1/N of each global batch of ``tokens_per_step``
    rows with DistributedDataParallel; what the algorithm computes over the batch (the BatchTopK
    selection and threshold, the dead-latent counts, the auxiliary loss's normalisation, resampling) is
    global, so the result is single-process training's. Rank 0 logs, checkpoints and exports.
    """
    if isinstance(source, (str, Path)):
        raise TypeError(
            f"source must be an ActivationStore (ActivationStore(path) opens one) or a ModelSource, got {source!r}"
        )
    run_dir = Path(run_dir).expanduser()
    device = distributed.init_from_env(cfg.device)
    if cfg.tokens_per_step % distributed.world_size():
        raise ValueError(
            f"tokens_per_step {cfg.tokens_per_step} does not split evenly over {distributed.world_size()} processes"
        )
    from_store = isinstance(source, ActivationStore)
    factors = load_norm_factors(source) if from_store else source.norm_factors()
    cc_cfg, identity = prepare_run(cfg, cc_cfg, source, run_dir, factors)
    if finished(run_dir, cfg.overwrite):  # with these settings (prepare_run checked them)
        return CrossCoder.load(run_dir, device)
    distributed.barrier()  # every rank has checked before rank 0 deletes
    if cfg.overwrite and distributed.rank() == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    crosscoder = initial_crosscoder(cfg, cc_cfg, source, factors, device)
    optimizer = torch.optim.Adam(  # fused: one kernel over all parameters (bench/bench_train.py)
        crosscoder.parameters(), lr=cfg.resolved_lr(), betas=(cfg.beta1, cfg.beta2), fused=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, cfg.total_steps, cfg))
    start = load_checkpoint(run_dir, crosscoder, optimizer, scheduler, device) if cfg.resume else 0
    began = time.perf_counter()
    if start and from_store and not source.remote:  # a resume reads the store again: check its shards
        source.verify()
    store = held_out_store(source, run_dir, factors)
    log = MetricsLog(run_dir, cfg, cc_cfg, store, write_run(run_dir, identity, store), start)
    first_bad = train_steps(crosscoder, optimizer, scheduler, source, cfg, start, log, run_dir, factors)
    seconds = time.perf_counter() - began
    crosscoder.eval()
    refuse_nonfinite(first_bad, source, cfg, run_dir)
    if not finite(crosscoder.state_dict()):
        raise FloatingPointError(diverged(run_dir, cfg.total_steps, "the weights are not finite"))
    if distributed.rank() == 0:
        export(crosscoder, factors, run_dir)
        write_json(run_dir / "timing.json", {"seconds": seconds, "steps": cfg.total_steps - start})
        report_health(crosscoder, store, factors, cfg, run_dir, log.run)
        log.finish(cfg)
        (run_dir / "train.lock").unlink()
    distributed.barrier()
    return crosscoder


def train_steps(
    crosscoder: CrossCoder,
    optimizer: torch.optim.Adam,
    scheduler,
    source: ActivationStore | ModelSource,
    cfg: TrainConfig,
    start: int,
    log: MetricsLog,
    run_dir: Path,
    factors: torch.Tensor,
) -> torch.Tensor:
    """Steps ``start`` to the end, with resampling, logging every ``log_every`` steps and checkpoints every
    ``save_every``; a non-finite loss is refused at the first of these after it. Returns the device flag of the
    first step whose loss was not finite (-1: none), kept without a host sync."""
    rank, world, device = distributed.rank(), distributed.world_size(), str(crosscoder.W_dec.device)
    total_steps, cc_cfg = cfg.total_steps, crosscoder.cfg
    objective = Objective(crosscoder)
    if world > 1:
        objective = DistributedDataParallel(
            objective, forward_sync_buffers=False, device_ids=[device] if device.startswith("cuda") else None
        )
    scale = factors[None, :, None].to(device)
    first_bad = torch.tensor(-1, device=device)
    bar = progress(range(start, total_steps), initial=start, total=total_steps, desc="training", disable=rank > 0)
    for step, x in zip(bar, training_batches(source, cfg, start, process=(rank, world))):
        x = x.to(device, non_blocking=True) * scale
        l1_coeff = l1_coeff_at(step, total_steps, cfg, cc_cfg.l1_coeff)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):  # float32 master weights
            out = objective(x, l1_coeff, k_at(step, total_steps, cfg, cc_cfg))
        first_bad = torch.where(torch.isfinite(out.loss.detach()) | (first_bad >= 0), first_bad, step)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(crosscoder.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.resample_every and (step + 1) % cfg.resample_every == 0 and step + 1 <= total_steps // 2:
            resample_latents(crosscoder, optimizer, distributed.all_gather_cat(x))
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
            refuse_nonfinite(first_bad, source, cfg, run_dir)
            metrics = step_metrics(out, step + 1, l1_coeff, scheduler.get_last_lr()[0], crosscoder, device)
            log.log(metrics)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3g}", L0=f"{metrics['l0_loss']:.1f}", EV=f"{metrics['explained_variance']:.3f}"
            )
        if (step + 1) % cfg.save_every == 0 and step + 1 < total_steps:
            refuse_nonfinite(first_bad, source, cfg, run_dir)
            if not finite(crosscoder.state_dict()):
                raise FloatingPointError(diverged(run_dir, step + 1, "the weights are not finite"))
            if rank == 0:
                save_checkpoint(run_dir, crosscoder, optimizer, scheduler, step + 1)
            distributed.barrier()
        del out  # it holds the batch's reconstruction: not kept through the next step's forward
    return first_bad


def report_health(
    crosscoder: CrossCoder, store: ActivationStore, factors: torch.Tensor, cfg: TrainConfig, run_dir: Path, run
) -> None:
    """Measure the dictionary's health on the store's first ``cfg.health_tokens`` held-out tokens: write
    health.json, put it in the wandb run's summary, and print it (with the fix past a threshold)."""
    if not len(store.split_range("val")):
        print("dictionary health not measured: the store has no held-out rows (collect with val_fraction > 0)")
        return
    health = dictionary_health(
        crosscoder, encode(crosscoder, store, factors, "val", max_tokens=cfg.health_tokens, device=cfg.device)
    )
    health.save(run_dir / "health.json")
    if run:
        run.summary.update({f"health/{name}": value for name, value in health.summary().items()})
    print(health.report(crosscoder.cfg.variant))


def training_data(source: str, store_dir: str | Path, collect: CollectConfig) -> str | Path | CollectConfig:
    """What 03's ``source`` parameter names: the store at ``store_dir`` (``"store"``), or the models, collected on
    the fly with 01's settings ``collect`` (``"models"``)."""
    if source not in ("store", "models"):
        raise ValueError(f"source must be 'store' or 'models', got {source!r}")
    return store_dir if source == "store" else collect


def launch(
    cfg: TrainConfig,
    cc_cfg: CrossCoderConfig,
    data: str | Path | CollectConfig,
    run_dir: str | Path,
    nproc_per_node: int = 1,
    buffer_tokens: int = 2**18,
) -> CrossCoder:
    """Train on ``data``, a store or (a CollectConfig) the models, in this process (``nproc_per_node=1``), or
    under ``torchrun`` with that many processes (one per GPU; gloo on CPU); from a store that ends with the
    weights one process would. Returns the trained crosscoder."""
    if nproc_per_node == 1:
        source = ModelSource(data, buffer_tokens) if isinstance(data, CollectConfig) else ActivationStore(data)
        return train_crosscoder(cfg, source, run_dir, cc_cfg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc_per_node)]
    command += ["-m", "crosscoder_utils.train", str(run_dir)]
    if isinstance(data, CollectConfig):
        command += ["--collect", json.dumps(data.to_dict()), "--buffer-tokens", str(buffer_tokens)]
    else:
        command += ["--store", str(data)]
    command += ["--train", json.dumps(cfg.to_dict()), "--crosscoder", json.dumps(cc_cfg.to_dict())]
    subprocess.run(command, check=True)
    return CrossCoder.load(run_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m crosscoder_utils.train RUN_DIR (--store STORE | --collect JSON) [--train JSON]
    [--crosscoder JSON]``, alone or under ``torchrun --nproc_per_node N`` (one process per GPU; multi-node with
    torchrun's --nnodes and --rdzv-endpoint). The JSON objects hold CollectConfig (training from the models),
    TrainConfig and CrossCoderConfig fields."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m crosscoder_utils.train", description=main.__doc__)
    parser.add_argument("run_dir", help="run directory (checkpoints, metrics, export)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--store", help="activation store (collected and normalised): a directory or a URL")
    data.add_argument("--collect", help="CollectConfig fields as a JSON object: train from the models")
    parser.add_argument("--buffer-tokens", type=int, default=2**18, help="with --collect: the shuffling buffer")
    parser.add_argument("--train", default="{}", help="TrainConfig fields as a JSON object")
    parser.add_argument("--crosscoder", default="{}", help="CrossCoderConfig fields as a JSON object")
    args = parser.parse_args(argv)
    if args.collect:
        source = ModelSource(CollectConfig.from_dict(json.loads(args.collect)), args.buffer_tokens)
    else:
        source = ActivationStore(args.store)
    train_crosscoder(
        TrainConfig.from_dict(json.loads(args.train)),
        source,
        args.run_dir,
        CrossCoderConfig.from_dict(json.loads(args.crosscoder)),
    )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crosscoder_utils import (
    ActivationStore,
    CrossCoder,
    CrossCoderConfig,
    TrainConfig,
    estimate_norm_factors,
    train_crosscoder,
)
from crosscoder_utils.analysis import latent_kinds
from crosscoder_utils.run import load_run
from crosscoder_utils.synthetic import SyntheticConfig, generate, score

# independent features at one firing rate, identical directions in both models, the fine-tune 4x larger
EASY = SyntheticConfig(
    d_model=64,
    n_shared=96,
    n_exclusive=32,
    max_rate=0.04,
    min_rate=0.04,
    shared_cosine=1.0,
    gain_change_frac=0.0,
    parent_frac=0.0,
    n_tokens=100_000,
)


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    activations, truth, _ = generate(EASY)
    store = ActivationStore.from_arrays(tmp_path_factory.mktemp("gt") / "store", activations)
    return store, truth, estimate_norm_factors(store, n_batches=10)


def test_norm_factors_bring_mean_norm_to_sqrt_d(ground_truth):
    store, _, factors = ground_truth
    x = store.read(np.arange(len(store)))
    assert (x.norm(dim=-1).mean(0)[1] / x.norm(dim=-1).mean(0)[0]) > 3  # the fine-tune is ~4x larger
    torch.testing.assert_close(
        (x * factors[None, :, None]).norm(dim=-1).mean(0), torch.full((2,), math.sqrt(64)), rtol=0.02, atol=0
    )
    assert json.loads((Path(store.path) / "norm.json").read_text())["norm_factors"] == factors.tolist()


@pytest.mark.parametrize(
    "variant,settings",
    [
        (
            "relu",
            dict(l1_coeff=2.0, train_tokens=300_000),
        ),  # the default lr (lr_steps_product / steps): 12 of 12 seeds >= 0.97
        ("batchtopk", dict(k=8, lr=2e-3, train_tokens=900_000)),
    ],
)
def test_each_variant_recovers_and_classifies_the_true_features(ground_truth, tmp_path, variant, settings):
    store, truth, factors = ground_truth
    crosscoder_fields = {k: settings.pop(k) for k in ("l1_coeff", "k") if k in settings}
    cfg = TrainConfig(tokens_per_step=512, lr_warmup_frac=0.05, log_to="none", log_every=50, **settings)
    cc = train_crosscoder(
        cfg,
        store,
        tmp_path / variant,
        CrossCoderConfig(dict_size=320, variant=variant, dead_tokens=20_000, **crosscoder_fields),
    )
    result = score(cc, truth, factors)
    assert min(result.recovered.values()) >= 0.9, result
    assert min(result.classified.values()) >= 0.9, result
    assert result.false_exclusive_rate <= 0.05, result


TRAIN_SCRIPT = """
import sys
from crosscoder_utils import ActivationStore, CrossCoderConfig, TrainConfig, train_crosscoder
cfg = TrainConfig(lr=1e-3, tokens_per_step=256, train_tokens=600 * 256, save_every=40, log_every=10, log_to="none",
                  lr_warmup_frac=0.1, resume=True)
train_crosscoder(cfg, ActivationStore(sys.argv[1]), sys.argv[2],
                 CrossCoderConfig(dict_size=256, variant="batchtopk", k=4, dead_tokens=2000))
"""


def killed_and_whole(command, tmp_path: Path) -> tuple[dict, dict]:
    """The weights of a run killed with SIGKILL after its first checkpoint past step 9 and resumed, and of
    the same run uninterrupted; ``command(run_dir)`` is the argument list that trains (with resume=True)."""
    run = lambda name: subprocess.Popen(command(tmp_path / name), env={**os.environ, "TQDM_DISABLE": "1"})
    proc = run("killed")
    while not list((tmp_path / "killed/checkpoints").glob("step_0000[1-9]*")):
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/crosscoder.safetensors").exists()
    for name in ("killed", "whole"):
        assert run(name).wait() == 0
    return tuple(load_file(tmp_path / name / "crosscoder.safetensors") for name in ("killed", "whole"))


def test_resume_after_kill_equals_an_uninterrupted_run(ground_truth, tmp_path):
    store = ground_truth[0]
    resumed, whole = killed_and_whole(
        lambda run_dir: [sys.executable, "-c", TRAIN_SCRIPT, str(store.path), str(run_dir)], tmp_path
    )
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key
    assert (tmp_path / "killed/metrics.jsonl").read_text() == (tmp_path / "whole/metrics.jsonl").read_text()
    assert store.n_batches(256) < 600  # the run crosses into a second, reshuffled pass over the store


def test_bad_runs_are_refused(ground_truth, tmp_path):
    store, _, _ = ground_truth
    cfg = TrainConfig(tokens_per_step=256, train_tokens=2560, log_to="none")
    bare = ActivationStore.from_arrays(tmp_path / "bare", torch.randn(600, 2, 8))
    with pytest.raises(FileNotFoundError, match="02_normalize"):
        train_crosscoder(cfg, bare, tmp_path / "r0")
    with pytest.raises(ValueError, match="d_model=32 but the activations have d_model=64"):
        train_crosscoder(cfg, store, tmp_path / "r1", CrossCoderConfig(d_model=32, dict_size=64))
    train_crosscoder(cfg, store, tmp_path / "r2", CrossCoderConfig(dict_size=64))
    estimate_norm_factors(bare, n_batches=2, tokens_per_batch=256)
    with pytest.raises(ValueError, match="store_identity"):
        train_crosscoder(
            TrainConfig(tokens_per_step=256, train_tokens=2560, log_to="none", resume=True),
            bare,
            tmp_path / "r2",
            CrossCoderConfig(dict_size=64),
        )
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_a_finished_run_is_reused_and_overwrite_trains_again(ground_truth, tmp_path):
    store = ground_truth[0]
    cfg = TrainConfig(tokens_per_step=256, train_tokens=2560, log_to="none")
    first = train_crosscoder(cfg, store, tmp_path / "run", CrossCoderConfig(dict_size=64))
    written = (tmp_path / "run/crosscoder.safetensors").stat().st_mtime_ns
    again = train_crosscoder(cfg, store, tmp_path / "run", CrossCoderConfig(dict_size=64))
    assert torch.equal(again.W_dec, first.W_dec)
    assert (tmp_path / "run/crosscoder.safetensors").stat().st_mtime_ns == written  # read, not trained again
    with pytest.raises(
        ValueError, match=r"differing: \['crosscoder.dict_size'\]\); use another run_dir, or overwrite=True"
    ):
        train_crosscoder(cfg, store, tmp_path / "run", CrossCoderConfig(dict_size=32))
    other = train_crosscoder(
        dataclasses.replace(cfg, overwrite=True), store, tmp_path / "run", CrossCoderConfig(dict_size=32)
    )
    assert other.cfg.dict_size == 32 and CrossCoder.load(tmp_path / "run").cfg.dict_size == 32


BRIEF_METRICS = (
    *("loss", "l2_loss", "l1_loss", "l0_loss", "l1_coeff", "lr"),
    *("explained_variance", "explained_variance_A", "explained_variance_B"),
)
"""The training metrics the design brief names (A the base, B the fine-tune)."""


def test_every_logged_step_has_the_briefs_metrics_beside_the_extras(ground_truth, tmp_path):
    store = ground_truth[0]
    cfg = TrainConfig(tokens_per_step=256, train_tokens=2560, lr=1e-3, log_every=2, l1_warmup_frac=0.5, log_to="none")
    train_crosscoder(cfg, store, tmp_path / "run", CrossCoderConfig(dict_size=32, l1_coeff=2.0))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10]
    for row in rows:
        assert set(row) == {*BRIEF_METRICS, "step", "penalty", "aux_loss", "dead_fraction"}, row
    assert [row["l1_coeff"] for row in rows] == pytest.approx([0.8, 1.6, 2.0, 2.0, 2.0])  # λ after its warm-up
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[0]["lr"]  # decays over the last 20 %


def test_data_init_starts_from_paired_activations(ground_truth, tmp_path):
    store, _, factors = ground_truth
    # one Adam step of 1e-9 moves each weight by about 1e-9, far below the tolerances: the result is the init
    cfg = TrainConfig(tokens_per_step=256, train_tokens=256, lr=1e-9, log_to="none", init="data", lr_decay_frac=0.0)
    cc = train_crosscoder(cfg, store, tmp_path / "run", CrossCoderConfig(dict_size=64))
    torch.testing.assert_close(cc.decoder_norms(), torch.full((64, 2), 0.08))
    torch.testing.assert_close(cc.W_enc, cc.W_dec.permute(1, 2, 0))
    x = store.read(np.arange(len(store))) * factors[None, :, None]
    torch.testing.assert_close(cc.b_dec, x.mean(0), atol=0.05 * x.std().item(), rtol=0)  # a sample's mean
    centred = torch.nn.functional.normalize(x - x.mean(0), dim=-1)
    cosines = torch.einsum("lmd,tmd->mlt", torch.nn.functional.normalize(cc.W_dec, dim=-1), centred)
    best, token = cosines.max(dim=-1)
    assert (best > 0.99).all() and torch.equal(
        token[0], token[1]
    )  # each latent starts on one real token, in both models


def test_k_annealing_schedule():
    from crosscoder_utils.train import k_at

    cc_cfg = CrossCoderConfig(variant="batchtopk", k=8, dict_size=64)
    cfg = TrainConfig(k_anneal_factor=5, k_anneal_frac=0.5, train_tokens=100 * 4096)
    assert [k_at(step, 100, cfg, cc_cfg) for step in (0, 25, 49, 50, 99)] == [40, 24, 9, 8, 8]
    assert k_at(0, 100, TrainConfig(k_anneal_factor=1), cc_cfg) == 8
    assert k_at(0, 100, TrainConfig(k_anneal_factor=10), cc_cfg) == 64  # at most dict_size


def test_resampling_moves_only_dead_latents_towards_the_residual():
    from crosscoder_utils.train import resample_latents

    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=8, n_models=2, dict_size=32, dead_tokens=100)).train()
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-2)
    x = torch.randn(64, 2, 8)
    x[:, 0] *= 0.01  # the residual lives almost only in model 1
    cc.losses(x).loss.backward()
    optimizer.step()
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[3, 7, 20]] = True
    cc.tokens_since_fired.copy_(torch.where(dead, 100, 0))
    before = {name: p.detach().clone() for name, p in cc.named_parameters()}
    residual = x - cc.eval()(x)
    cc.train()
    assert resample_latents(cc, optimizer, x) == 3
    assert torch.equal(cc.W_dec[~dead], before["W_dec"][~dead]) and torch.equal(
        cc.W_enc[..., ~dead], before["W_enc"][..., ~dead]
    )
    cosines = (
        torch.nn.functional.normalize(cc.W_dec[dead].flatten(1), dim=1)
        @ torch.nn.functional.normalize(residual.flatten(1), dim=1).T
    )
    assert torch.allclose(cosines.max(dim=1).values, torch.ones(3))  # each is one token's residual direction
    torch.testing.assert_close(cc.W_dec[dead].flatten(1).norm(dim=1), torch.full((3,), 0.08 * 2**0.5))
    assert (cc.decoder_norms()[dead, 1] / cc.decoder_norms()[dead].sum(1) > 0.9).all()  # starts model-1 exclusive
    assert torch.equal(cc.b_enc[dead], torch.zeros(3)) and not cc.dead_latents().any()
    for param in (cc.W_dec, cc.b_enc):
        assert (optimizer.state[param]["exp_avg"][dead] == 0).all() and (
            optimizer.state[param]["exp_avg"][~dead] != 0
        ).any()
    assert (optimizer.state[cc.W_enc]["exp_avg_sq"][..., dead] == 0).all()


def test_resampling_keeps_one_latent_of_a_duplicate_group_the_one_that_writes_most():
    from crosscoder_utils.train import resample_latents

    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=8, n_models=2, dict_size=32, dead_tokens=100)).train()
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-2)
    x = torch.randn(256, 2, 8)
    with torch.no_grad():  # 5 and 9 write latent 2's direction, 9 at twice its size: 9 writes the most
        cc.W_dec[5], cc.W_dec[9] = 0.5 * cc.W_dec[2], 2 * cc.W_dec[2]
        cc.W_enc[:, :, 5] = cc.W_enc[:, :, 9] = cc.W_enc[:, :, 2]
    cc.losses(x).loss.backward()
    optimizer.step()
    cc.W_dec.data[[2, 5, 9]] = cc.W_dec.data[9] * torch.tensor([1.0, 0.25, 1.0])[:, None, None]  # parallel again
    kept = cc.W_dec.detach().clone()
    assert resample_latents(cc, optimizer, x) == 2
    moved = (cc.W_dec != kept).flatten(1).any(1)
    assert moved.nonzero().squeeze(1).tolist() == [2, 5]


def test_partition_survives_resume_and_export(ground_truth, tmp_path):
    store, _, factors = ground_truth
    cfg = dict(tokens_per_step=256, train_tokens=40 * 256, save_every=25, log_to="none", init="data", resample_every=10)
    cc_cfg = CrossCoderConfig(
        dict_size=96, variant="batchtopk", k=4, n_shared_latents=16, n_dedicated=8, dead_tokens=1000
    )
    whole = train_crosscoder(TrainConfig(**cfg), store, tmp_path / "run", cc_cfg)
    (tmp_path / "run/crosscoder.safetensors").unlink()
    resumed = train_crosscoder(TrainConfig(**cfg, resume=True), store, tmp_path / "run", cc_cfg)  # from step 25
    assert torch.equal(resumed.W_dec, whole.W_dec)
    exported = CrossCoder.load(tmp_path / "run")
    raw = CrossCoder.load(tmp_path / "run/raw")
    for cc in (resumed, exported):
        assert torch.equal(cc.W_dec[:16, 0], cc.W_dec[:16, 1])
    torch.testing.assert_close(
        raw.W_dec[:16, 0] * factors[0], raw.W_dec[:16, 1] * factors[1]
    )  # tied in normalised units
    for cc in (resumed, exported, raw):
        assert (cc.W_dec[16:24, 1] == 0).all() and (cc.W_dec[24:32, 0] == 0).all()
        assert (cc.W_enc[1, :, 16:24] == 0).all() and (cc.W_enc[0, :, 24:32] == 0).all()
        assert cc.W_dec[16:32].abs().sum() > 0
    kinds = latent_kinds(raw)
    assert (kinds[16:24] == 0).all() and (kinds[24:32] == 1).all() and (kinds[:16] == -1).all()


DISTRIBUTED = [
    (
        "relu",
        dict(lr=2e-3, init="data", resample_every=4),
        dict(dict_size=96, dead_tokens=1024, n_shared_latents=8, n_dedicated=8),
    ),
    (
        "batchtopk",
        dict(lr=2e-3, k_anneal_factor=4, resample_every=4),
        dict(dict_size=96, variant="batchtopk", k=4, dead_tokens=1024, n_shared_latents=8, n_dedicated=8),
    ),
]


@pytest.mark.parametrize("name,train_fields,cc_fields", DISTRIBUTED, ids=[d[0] for d in DISTRIBUTED])
def test_two_process_ddp_equals_single_process_training(ground_truth, tmp_path, name, train_fields, cc_fields):
    store = ground_truth[0]
    train_fields = dict(
        tokens_per_step=512, train_tokens=24 * 512, log_every=6, save_every=10, log_to="none", **train_fields
    )
    single = train_crosscoder(TrainConfig(**train_fields), store, tmp_path / "single", CrossCoderConfig(**cc_fields))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "crosscoder_utils.train",
        str(tmp_path / "ddp"),
        "--store",
        str(store.path),
        "--train",
        json.dumps(train_fields),
        "--crosscoder",
        json.dumps(cc_fields),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env)
    ddp = CrossCoder.load(tmp_path / "ddp")
    assert single.dead_latents().any() or name == "relu"
    for key, value in single.state_dict().items():
        torch.testing.assert_close(
            ddp.state_dict()[key], value, rtol=1e-3, atol=1e-4, msg=key
        )  # float reassociation only
    # as if killed after its step-20 checkpoint (the export removed): two processes resume to the same weights
    (tmp_path / "ddp/crosscoder.safetensors").unlink()
    subprocess.run(
        command[:-4] + ["--train", json.dumps({**train_fields, "resume": True})] + command[-2:], check=True, env=env
    )
    resumed = CrossCoder.load(tmp_path / "ddp")
    for key, value in ddp.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    logged = [json.loads(line)["step"] for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert logged == [6, 12, 18, 24]


def test_a_run_records_a_store_inside_the_repository_relative_to_it(tmp_path):
    from crosscoder_utils.files import REPO

    inside = REPO / "outputs" / f"test-store-{os.getpid()}"
    try:
        store = ActivationStore.from_arrays(inside, torch.randn(3000, 2, 8))
        estimate_norm_factors(store, n_batches=2, tokens_per_batch=256)
        cfg = TrainConfig(tokens_per_step=256, train_tokens=2560, log_to="none")
        train_crosscoder(cfg, store, tmp_path / "run", CrossCoderConfig(dict_size=32))
        recorded = json.loads((tmp_path / "run/run.json").read_text())["store"]
        assert recorded == f"outputs/test-store-{os.getpid()}"  # travels with the repository
        assert Path(load_run(tmp_path / "run").store.path) == inside
    finally:
        shutil.rmtree(inside, ignore_errors=True)


def test_runs_with_the_same_folder_name_get_their_own_wandb_id_and_a_resume_keeps_it(ground_truth, tmp_path):
    store = ground_truth[0]
    cfg = TrainConfig(tokens_per_step=256, train_tokens=2560, save_every=5, log_to="none")
    ids = []
    for parent in ("a", "b"):
        train_crosscoder(cfg, store, tmp_path / parent / "run", CrossCoderConfig(dict_size=32))
        ids.append(json.loads((tmp_path / parent / "run/run.json").read_text())["wandb_id"])
    assert ids[0] != ids[1]
    (tmp_path / "a/run/crosscoder.safetensors").unlink()
    train_crosscoder(dataclasses.replace(cfg, resume=True), store, tmp_path / "a/run", CrossCoderConfig(dict_size=32))
    assert json.loads((tmp_path / "a/run/run.json").read_text())["wandb_id"] == ids[0]


def test_the_sparse_path_is_as_set_and_on_a_cpu_auto_takes_it_without_timing():
    from crosscoder_utils.train import SPARSE_CHOICES, use_sparse_path

    SPARSE_CHOICES.clear()
    model = CrossCoder(CrossCoderConfig(d_model=16, n_models=2, dict_size=64, variant="batchtopk", k=4)).train()
    assert use_sparse_path(model, TrainConfig(sparse_path="auto"), 128, "cpu") is True
    assert use_sparse_path(model, TrainConfig(sparse_path="on"), 128, "cpu") is True
    assert use_sparse_path(model, TrainConfig(sparse_path="off"), 128, "cpu") is False
    assert not SPARSE_CHOICES  # nothing measured: CPU runs never depend on a timing


def test_a_resume_takes_the_path_the_run_took(tmp_path):
    from crosscoder_utils.run import load_checkpoint, save_checkpoint

    model = CrossCoder(CrossCoderConfig(d_model=16, n_models=2, dict_size=64, variant="batchtopk", k=4))
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model.sparse_path = False
    save_checkpoint(tmp_path, model, optimizer, scheduler, step=7)
    model.sparse_path = True  # what auto might measure in the resumed process
    assert load_checkpoint(tmp_path, model, optimizer, scheduler, "cpu") == 7 and model.sparse_path is False

"""What is refused before anything runs: config values out of range, local paths that do not exist (never
sent to the Hub), and model pairs whose tokenizers differ in any part."""

import json
import re
import shutil
import time
from pathlib import Path

import datasets
import pytest
import transformers
from tokenizers import models, normalizers
from transformers.models.clvp.tokenization_clvp import ClvpTokenizer

from crosscoder_utils import CrossCoder, collect_activations, load_model_pair
from crosscoder_utils.collect import load_texts
from crosscoder_utils.config import CollectConfig, CrossCoderConfig, OrganismConfig, TrainConfig
from crosscoder_utils.models import check_same_tokenizer, hub_unreachable, local_or_hub
from crosscoder_utils.organism import TINY
from crosscoder_utils.synthetic import PRESETS, SyntheticConfig, preset

BAD_VALUES = [
    (CollectConfig, "layer", -1, "layer must be >= 0, got -1"),
    (CollectConfig, "n_tokens", 0, "n_tokens must be > 0, got 0"),
    (CollectConfig, "seq_len", -8, "seq_len must be > 0, got -8"),
    (CollectConfig, "exclude_first_n", -1, "exclude_first_n must be >= 0, got -1"),
    (CollectConfig, "exclude_token_ids", [3, -1], "each of exclude_token_ids must be >= 0, got -1"),
    (CollectConfig, "val_fraction", 1.0, "val_fraction must be in [0, 1), got 1.0"),
    (CollectConfig, "val_fraction", -0.1, "val_fraction must be in [0, 1), got -0.1"),
    (CollectConfig, "model_dtype", "float8", "model_dtype='float8' is not one of"),
    (OrganismConfig, "seed", -1, "seed must be >= 0, got -1"),
    (OrganismConfig, "d_model", 0, "d_model must be > 0, got 0"),
    (OrganismConfig, "n_heads", 3, "d_model (128) must be a multiple of n_heads (3)"),
    (OrganismConfig, "base_steps", 0, "base_steps must be > 0, got 0"),
    (OrganismConfig, "lr", 0.0, "lr must be in (0, 1], got 0.0"),
    (OrganismConfig, "finetune_lr", 3.0, "finetune_lr must be in (0, 1], got 3.0"),
    (OrganismConfig, "kl_to_base", -1.0, "kl_to_base must be >= 0, got -1.0"),
    (CrossCoderConfig, "d_model", 0, "d_model must be > 0 or None, got 0"),
    (CrossCoderConfig, "n_models", 0, "n_models must be >= 1 or None, got 0"),
    (CrossCoderConfig, "dict_size", 0, "dict_size must be > 0, got 0"),
    (CrossCoderConfig, "k", 0, "k must be >= 1, got 0"),
    (CrossCoderConfig, "l1_coeff", -1.0, "l1_coeff must be >= 0, got -1.0"),
    (CrossCoderConfig, "l1_coeff", float("nan"), "l1_coeff must be >= 0, got nan"),
    (CrossCoderConfig, "dec_init_norm", 0.0, "dec_init_norm must be > 0, got 0.0"),
    (CrossCoderConfig, "aux_coeff", -0.5, "aux_coeff must be >= 0 or None, got -0.5"),
    (CrossCoderConfig, "k_aux", 0, "k_aux must be >= 1 or None, got 0"),
    (CrossCoderConfig, "dead_tokens", -1, "dead_tokens must be > 0, got -1"),
    (CrossCoderConfig, "threshold_decay", 1.0, "threshold_decay must be in [0, 1), got 1.0"),
    (CrossCoderConfig, "n_shared_latents", -1, "n_shared_latents must be >= 0, got -1"),
    (CrossCoderConfig, "shared_penalty_ratio", 0.0, "shared_penalty_ratio must be in (0, 1], got 0.0"),
    (CrossCoderConfig, "tanh_scale", 0.0, "tanh_scale must be > 0 or None, got 0.0"),
    (TrainConfig, "lr", 0.0, "lr must be in (0, 1] or None, got 0.0"),
    (TrainConfig, "lr", -1e-3, "lr must be in (0, 1] or None, got -0.001"),
    (TrainConfig, "lr", 10.0, "lr must be in (0, 1] or None, got 10.0"),
    (TrainConfig, "lr_steps_product", 0.0, "lr_steps_product must be > 0, got 0.0"),
    (TrainConfig, "beta2", 1.0, "beta2 must be in [0, 1), got 1.0"),
    (TrainConfig, "tokens_per_step", 0, "tokens_per_step must be > 0, got 0"),
    (TrainConfig, "lr_warmup_frac", 1.5, "lr_warmup_frac must be in [0, 1], got 1.5"),
    (TrainConfig, "lr_warmup_frac", 0.9, "lr_warmup_frac + lr_decay_frac (0.9 + 0.2) must be <= 1"),
    (TrainConfig, "l1_warmup_frac", -0.05, "l1_warmup_frac must be in [0, 1], got -0.05"),
    (TrainConfig, "k_anneal_frac", 2.0, "k_anneal_frac must be in [0, 1], got 2.0"),
    (TrainConfig, "max_grad_norm", -1.0, "max_grad_norm must be > 0, got -1.0"),
    (TrainConfig, "k_anneal_factor", 0.5, "k_anneal_factor must be >= 1, got 0.5"),
    (TrainConfig, "resample_every", 0, "resample_every must be > 0 or None, got 0"),
    (TrainConfig, "seed", -3, "seed must be >= 0, got -3"),
    (SyntheticConfig, "n_models", 1, "n_models must be >= 2, got 1"),
    (SyntheticConfig, "n_shared", 0, "n_shared must be > 0, got 0"),
    (SyntheticConfig, "max_rate", 1.5, "max_rate must be in (0, 1], got 1.5"),
    (SyntheticConfig, "min_rate", 0.5, "min_rate (0.5) must be <= max_rate (0.03)"),
    (SyntheticConfig, "shared_cosine", 1.2, "shared_cosine must be in [-1, 1], got 1.2"),
    (SyntheticConfig, "parent_cofire", 1.1, "parent_cofire must be in [0, 1], got 1.1"),
    (SyntheticConfig, "gain_change_frac", -0.2, "gain_change_frac must be in [0, 1], got -0.2"),
    (SyntheticConfig, "model_scales", (1.0, 4.0, 2.0), "model_scales (1.0, 4.0, 2.0) must have one entry per model"),
    (SyntheticConfig, "model_scales", (1.0, 0.0), "each of model_scales must be > 0, got 0.0"),
    (SyntheticConfig, "noise", -0.01, "noise must be >= 0, got -0.01"),
]


@pytest.mark.parametrize("config,name,value,message", BAD_VALUES, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_a_config_value_out_of_range_is_refused_by_name(config, name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(**{name: value})


def test_k_above_dict_size_is_refused_for_batchtopk():
    with pytest.raises(ValueError, match=re.escape("k (100) must be <= dict_size (64) for variant 'batchtopk'")):
        CrossCoderConfig(variant="batchtopk", dict_size=64)
    CrossCoderConfig(variant="relu", dict_size=64)  # relu has no k


def test_defaults_presets_and_none_for_automatic_values_are_valid():
    for config in (CollectConfig, OrganismConfig, CrossCoderConfig, TrainConfig, SyntheticConfig):
        config()
    OrganismConfig(**TINY)
    for name in PRESETS:
        preset(name)
    auto = CrossCoderConfig(d_model=None, n_models=None, aux_coeff=None, k_aux=None)
    assert TrainConfig(lr=None, resample_every=None).resolved_lr() > 0
    filled = CrossCoderConfig(d_model=8, n_models=2, variant="batchtopk", k=4, dict_size=64)
    assert CrossCoderConfig.from_dict(filled.to_dict()) == filled and auto.aux_coeff == 0.0


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The Hub unreachable (offline mode), with an empty Hub cache of the test's own: returns the cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub_unreachable.cache_clear()
    yield Path(constants.HF_HUB_CACHE)
    hub_unreachable.cache_clear()


def cache_snapshot(cache: Path, repo_id: str, repo_type: str = "model") -> None:
    """What a download leaves in the Hub cache: a snapshot of one commit, which refs/main names."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (folder / "snapshots/0a1b2c3d").mkdir(parents=True)
    (folder / "snapshots/0a1b2c3d/config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs/main").write_text("0a1b2c3d")


def test_hub_ids_and_local_paths_are_told_apart(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/relu").mkdir(parents=True)
    cache_snapshot(offline, "owner/name")
    cache_snapshot(offline, "gpt2")
    assert local_or_hub("owner/name") == "owner/name" and local_or_hub("gpt2") == "gpt2"  # cached: read offline
    assert local_or_hub("runs/relu") == Path("runs/relu")  # shaped like owner/name, but on disk: local
    assert local_or_hub(tmp_path / "runs") == tmp_path / "runs"
    for name in ("./missing", "../missing", "/no/such/dir", "~/no-such-dir-here", "a/b/c", Path("missing")):
        with pytest.raises(FileNotFoundError, match=re.escape(f"no such directory: {name}")):
            local_or_hub(name)


def test_a_missing_relative_path_is_refused_at_once_when_the_hub_cannot_be_reached(make_model, offline, tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"nope/base is neither a local directory .*nor a Hub model this"):
        load_model_pair("nope/base", make_model())
    with pytest.raises(FileNotFoundError, match=r"nope/corpus is neither a local directory .*nor a Hub dataset"):
        load_texts("nope/corpus", "train", "text", tokenizer=None)
    assert time.perf_counter() - start < 1  # no retries


def test_an_empty_local_dataset_yields_no_tokens(make_model, tmp_path):
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
    cfg = CollectConfig(
        base_model=make_model(),
        finetuned_model=make_model(seed=1),
        dataset=str(tmp_path / "empty"),
        n_tokens=100,
        layer=1,
    )
    with pytest.raises(ValueError, match=r"dataset .*empty yields no tokens"):
        collect_activations(cfg, tmp_path / "store")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("missing", ["./missing", "/no/such/model"])
def test_a_missing_local_model_is_refused_at_once(make_model, missing):
    base = make_model()
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such directory: {missing}")):
        load_model_pair(base, missing)
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such directory: {missing}")):
        load_model_pair(missing, base)
    assert time.perf_counter() - start < 1  # no Hub lookup, no retries


def test_a_missing_crosscoder_or_dataset_path_is_refused_and_an_existing_one_read_locally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape("no such directory: ./runs/missing")):
        CrossCoder.load("./runs/missing")
    with pytest.raises(FileNotFoundError, match=re.escape("no such directory: data/corpus/missing")):
        load_texts("data/corpus/missing", "train", "text", tokenizer=None)
    cc = CrossCoder(CrossCoderConfig(d_model=4, n_models=2, dict_size=8))
    cc.save(tmp_path / "runs/relu")
    assert CrossCoder.load("runs/relu").cfg == cc.cfg  # an owner/name shape that exists is read from disk


def _tokenizer_variant(model_dir: str, directory: Path, change) -> str:
    """A copy of ``model_dir`` whose tokenizer ``change`` altered, saved with save_pretrained."""
    shutil.copytree(model_dir, directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    change(tokenizer)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _drop_second_merge(tokenizer):
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer.backend_tokenizer.model = models.BPE(vocab=model["vocab"], merges=merges[:1] + merges[2:])


def _lowercase(tokenizer):
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()


def _bos_end(tokenizer):
    tokenizer.bos_token = "<|end|>"


@pytest.mark.parametrize(
    "change,message",
    [
        (_drop_second_merge, r"differ: merges; the first probe text they split differently is 'The quick"),
        (_bos_end, r"differ: bos_token_id 0 vs \d+"),
        (_lowercase, r"differ: normalizer; the first probe text they split differently is 'The quick.* \(from token 0"),
    ],
    ids=["merges", "bos", "normalizer"],
)
def test_tokenizers_that_differ_in_one_part_are_refused_by_name(make_model, tmp_path, change, message):
    other = _tokenizer_variant(make_model(), tmp_path / "other", change)
    with pytest.raises(ValueError, match=f"the tokenizers of .* and '{re.escape(other)}' {message}"):
        load_model_pair(make_model(), other)


def test_a_fine_tune_that_declares_another_eos_token_is_accepted(make_model, tmp_path):
    def eos_end(tokenizer):  # as a chat fine-tune ends its turns with its own token
        tokenizer.eos_token = "<|end|>"

    other = _tokenizer_variant(make_model(), tmp_path / "other", eos_end)
    pair = load_model_pair(make_model(), other)
    assert pair.tokenizer.eos_token == "<|eos|>"


def test_a_saved_and_reloaded_copy_of_the_tokenizer_is_accepted(make_model, tmp_path):
    def pad_a_batch(tokenizer):  # the saved serialisation then records padding, which does not change ids
        tokenizer(["a", "longer text"], padding=True)

    same = _tokenizer_variant(make_model(), tmp_path / "same", pad_a_batch)
    assert json.loads((Path(same) / "tokenizer.json").read_text())["padding"] is not None
    assert load_model_pair(make_model(), same).names[1] == same


def test_slow_tokenizers_are_compared_by_vocabulary_merges_and_added_tokens(tokenizer, tmp_path):
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(model["vocab"]))
    for name, merges in (("all", model["merges"]), ("fewer", model["merges"][:1] + model["merges"][2:])):
        (tmp_path / f"{name}.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges))
    slow = [
        ClvpTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / f"{name}.txt")) for name in ("all", "all", "fewer")
    ]
    assert not slow[0].is_fast
    check_same_tokenizer(slow[0], slow[1])
    with pytest.raises(ValueError, match="differ: merges; the first probe text"):
        check_same_tokenizer(slow[0], slow[2])

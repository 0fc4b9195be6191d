"""Real tiny transformers built from configs, saved with save_pretrained, loaded like Hub models; the tiny organism;
and a fresh clone with the demo run in it at small sizes."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from crosscoder_utils.organism import TINY, base_corpus, train_tokenizer

TEXTS = base_corpus(64, seed=1) + ["", "   short one."]


def grouped_query(config, d, vocab, **extra):
    """A 2-block config of an architecture with grouped-query attention (2 heads, 1 key-value head)."""
    return config(
        num_hidden_layers=2,
        hidden_size=d,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * d,
        vocab_size=vocab,
        **extra,
    )


CONFIGS = {
    "gpt2": lambda d, vocab: transformers.GPT2Config(n_layer=2, n_embd=d, n_head=2, vocab_size=vocab, n_positions=128),
    "gpt_neox": lambda d, vocab: transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=d, num_attention_heads=2, intermediate_size=2 * d, vocab_size=vocab
    ),
    "llama": lambda d, vocab: grouped_query(transformers.LlamaConfig, d, vocab),
    "qwen2": lambda d, vocab: grouped_query(transformers.Qwen2Config, d, vocab),
    "gemma2": lambda d, vocab: grouped_query(transformers.Gemma2Config, d, vocab, head_dim=d // 2),
    "gemma3_text": lambda d, vocab: grouped_query(
        transformers.Gemma3TextConfig, d, vocab, head_dim=d // 2, sliding_window=8
    ),
}


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(base_corpus(500, seed=0), vocab_size=400)


def build_model(tmp_path_factory, tokenizer, arch, d=32, seed=0, name=None):
    torch.manual_seed(seed)
    config = CONFIGS[arch](d, len(tokenizer))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(name or f"{arch}_{d}_{seed}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory, tokenizer):
    cache = {}

    def make(arch="gpt2", d=32, seed=0):
        if (arch, d, seed) not in cache:
            cache[arch, d, seed] = build_model(tmp_path_factory, tokenizer, arch, d, seed)
        return cache[arch, d, seed]

    return make


@pytest.fixture(scope="session")
def organism(tmp_path_factory):
    from crosscoder_utils.config import OrganismConfig
    from crosscoder_utils.organism import build_organism

    return build_organism(OrganismConfig(out_dir=str(tmp_path_factory.mktemp("organism")), **TINY))


def collect_organism(organism, folder, n_tokens, val_fraction):
    """A store of ``n_tokens`` collected from the organism's corpus at layer 1 into ``folder / "store"``."""
    from crosscoder_utils import CollectConfig, collect_activations

    cfg = CollectConfig(
        base_model=organism.base,
        finetuned_model=organism.finetuned,
        dataset=organism.corpus,
        layer=1,
        n_tokens=n_tokens,
        seq_len=48,
        val_fraction=val_fraction,
    )
    return collect_activations(cfg, folder / "store")


def train_on_organism(organism, folder, n_tokens, val_fraction, norm_batches, train, crosscoder):
    """A store collected from the organism's corpus at layer 1 (``collect_organism``), normalised
    (``norm_batches``: (n_batches, tokens_per_batch)), and a crosscoder trained on it with ``train``
    (TrainConfig) and ``crosscoder`` (CrossCoderConfig) into ``folder / "run"``, returned."""
    from crosscoder_utils import estimate_norm_factors, train_crosscoder

    store = collect_organism(organism, folder, n_tokens, val_fraction)
    estimate_norm_factors(store, *norm_batches)
    train_crosscoder(train, store, folder / "run", crosscoder)
    return folder / "run"


@pytest.fixture(scope="session")
def analysed_organisms(organism, tmp_path_factory):
    """Tiny organisms of seeds 0-2 (the first ``organism``), each with a crosscoder trained at the demo's recipe scaled
    down and analysed: [(analysis, organism)]."""
    from crosscoder_utils import CrossCoderConfig, OrganismConfig, TrainConfig
    from crosscoder_utils import analysis as A
    from crosscoder_utils.organism import build_organism

    built = [organism] + [
        build_organism(
            OrganismConfig(out_dir=str(tmp_path_factory.mktemp(f"organism{seed}")), **{**TINY, "seed": seed})
        )
        for seed in (1, 2)
    ]
    train = TrainConfig(tokens_per_step=512, train_tokens=400_000, log_to="none", log_every=100)
    # the demo's recipe (λ 0.5, the tanh penalty, which merges duplicates) at this scale: c 0.05, since the tiny
    # organisms' penalty terms are smaller, and 160 latents, about what their 63,000 training tokens hold (135 live
    # on average)
    crosscoder = CrossCoderConfig(dict_size=160, l1_coeff=0.5, tanh_scale=0.05, dead_tokens=50_000)
    runs = [
        train_on_organism(o, tmp_path_factory.mktemp(f"compare{seed}"), 70_000, 0.1, (10, 2048), train, crosscoder)
        for seed, o in enumerate(built)
    ]
    return [(A.analyse(run), o) for run, o in zip(runs, built)]


ROOT = Path(__file__).parents[1]
GROUND_TRUTH = dict(  # 05 at a small size
    d_model=32,
    n_shared=60,
    n_exclusive=20,
    n_tokens=40_000,
    preset="relu",
    overrides={"dict_size": 160, "tokens_per_step": 512},
)
SMALL = {  # notebook -> the parameters that make the demo small; everything else is the default
    "00_organism": TINY,
    "01_collect": {"layer": 1, "n_tokens": 3000, "seq_len": 48, "seqs_per_batch": 16, "val_fraction": 0.3},
    "02_normalize": {"n_batches": 4, "tokens_per_batch": 512},
    "03_train": {  # BatchTopK with shared and dedicated latents: the options a default run leaves out
        "dict_size": 128,
        "variant": "batchtopk",
        "k": 8,
        "tokens_per_step": 256,
        "train_tokens": 25_600,
        "dead_tokens": 10_000,
        "log_every": 10,
        "save_every": 50,
        "n_shared_latents": 8,
        "n_dedicated": 8,
        "resample_every": 20,
        "norm_penalty": 0.0,  # BatchTopK as published: k·B ordinary latents a batch (a penalty may keep fewer)
    },
    "04_analyze": {"n_top": 5, "n_eval_sequences": 8, "n_seeds": 2, "n_patched": 4, "patch_documents": 8},
    "05_ground_truth": GROUND_TRUTH,
    "06_compare": {"n_seeds": 2},
}


def run_in(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``command`` run in ``cwd`` with the package found there; its output in the assertion when it fails."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}  # the clone's package, not this checkout's
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def clone(tmp_path_factory):
    """The tracked files, as a clone has them, with this checkout's .venv; the demo's parameters in params/."""
    root = tmp_path_factory.mktemp("clone")
    for name in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split():
        if (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    (root / ".venv").symlink_to(ROOT / ".venv")
    params = tmp_path_factory.mktemp("params")
    for notebook, values in SMALL.items():
        (params / f"{notebook}.yaml").write_text(yaml.safe_dump(values))
    return root, params


@pytest.fixture(scope="session")
def demo(clone):
    """The clone after `make demo PARAMS=<SMALL>`: every notebook's report in outputs/ (test_fresh_clone and
    test_notebooks read them)."""
    root, params = clone
    run_in(["make", "-o", ".venv/installed", "demo", f"PARAMS={params}"], root)  # -o: the .venv is this checkout's
    return root

"""Real tiny transformers built from configs, saved with save_pretrained, loaded like Hub models."""

import pytest
import torch
import transformers

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

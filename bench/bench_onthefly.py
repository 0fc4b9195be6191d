"""Training straight from the models (``ModelSource``) against its two halves measured alone, on the same data
and the same loaded pair: collection alone (``collect_activations`` into a store) and training alone
(``train_crosscoder`` on that store, one pass of its training rows). Target: training from the models at
>= 80 % of the slower of the two, in tokens/s.

Default: the demo's organism (outputs/organism, `make demo`) at 01's defaults, a relu crosscoder of 1024
latents, 1024 tokens a step, on CPU. ``--gemma-shaped`` (a CUDA machine): a pair of Gemma-2-2B's shape (random
weights, bf16; bench_analyze_scale.GEMMA_2_2B) read at layer 13, on generated stories, 16,384 latents, 4096
tokens a step: the cost per token at that size.

Run: .venv/bin/python bench/bench_onthefly.py [--gemma-shaped]
"""

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from bench_analyze_scale import GEMMA_2_2B, timed

from crosscoder_utils import CollectConfig, CrossCoderConfig, TrainConfig, collect_activations, train_crosscoder
from crosscoder_utils.models import load_model_pair
from crosscoder_utils.normalize import estimate_norm_factors
from crosscoder_utils.organism import base_corpus, train_tokenizer
from crosscoder_utils.source import ModelSource


def gemma_shaped(root: Path) -> CollectConfig:
    """Two random models of Gemma-2-2B's shape saved as model directories, and generated stories."""
    texts = base_corpus(12_000, seed=0)
    tokenizer = train_tokenizer(texts, 512)
    names = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = transformers.Gemma2Config(
            **GEMMA_2_2B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
        )
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(root / f"model{seed}")
        tokenizer.save_pretrained(root / f"model{seed}")
        names.append(str(root / f"model{seed}"))
        del model
    return CollectConfig(
        base_model=names[0],
        finetuned_model=names[1],
        dataset=texts,
        layer=13,
        n_tokens=400_000,
        seq_len=128,
        seqs_per_batch=128,
        model_dtype="bfloat16",
        dtype="bfloat16",
        device="cuda",
    )


def main(gemma: bool) -> None:
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        if gemma:
            cfg, dict_size, tokens_per_step, buffer_tokens = gemma_shaped(root), 16_384, 4096, 262_144
        else:
            cfg, dict_size, tokens_per_step, buffer_tokens = CollectConfig(device="cpu"), 1024, 1024, 65_536
        pair = load_model_pair(cfg.base_model, cfg.finetuned_model, cfg.model_dtype, cfg.device)
        cc_cfg = CrossCoderConfig(dict_size=dict_size, dead_tokens=200_000)
        store, collecting = timed(lambda: collect_activations(cfg, root / "store", pair))
        estimate_norm_factors(store)
        steps = len(store.split_range("train")) // tokens_per_step
        train = TrainConfig(
            tokens_per_step=tokens_per_step, train_tokens=steps * tokens_per_step, log_to="none", save_every=10**9
        )
        _, on_store = timed(lambda: train_crosscoder(train, store, root / "on_store", cc_cfg))
        source, opening = timed(lambda: ModelSource(cfg, buffer_tokens, pair))
        _, from_models = timed(lambda: train_crosscoder(train, source, root / "from_models", cc_cfg))
    rates = {
        "collection alone": len(store) / collecting,
        "training alone (from the store)": train.train_tokens / on_store,
        "training from the models": train.train_tokens / from_models,
    }
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    for name, rate in rates.items():
        print(f"{name:<34} {rate:>9,.0f} tokens/s")
    slower = min(rates["collection alone"], rates["training alone (from the store)"])
    print(f"from the models / slower of the two: {rates['training from the models'] / slower:.2f} (target >= 0.80)")
    print(f"(opening the source, tokenising to number the rows: {opening:.1f} s, not included)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gemma-shaped", action="store_true", help="a pair of Gemma-2-2B's shape, on CUDA")
    main(parser.parse_args().gemma_shaped)

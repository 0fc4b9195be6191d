"""Collection and store-reading throughput, each measured side by side with its plain baseline.

1. collect_activations (nnsight traces of both models, exclusions, shard writes) against a plain
   transformers forward of both models on the same padded batches (target: >= 90 %).
2. ActivationStore.batches() against random batches from a raw numpy memmap of the same data (target: >= 50 %),
   from local disk and streamed over HTTP from a server on localhost (another process).

Run: .venv/bin/python bench/bench_collect.py
"""

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from crosscoder_utils import ActivationStore, CollectConfig, collect_activations, load_model_pair
from crosscoder_utils.collect import TracedPair, tokenize
from crosscoder_utils.organism import base_corpus, train_tokenizer


def build_pair(root: Path, d_model=256, n_layers=4):
    texts = base_corpus(3000, seed=0)
    tokenizer = train_tokenizer(texts, 512)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = transformers.GPT2Config(
            n_layer=n_layers, n_embd=d_model, n_head=4, vocab_size=len(tokenizer), n_positions=256
        )
        path = root / f"model{seed}"
        transformers.GPT2LMHeadModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths, texts


def bench_collection(root: Path):
    (base, finetuned), texts = build_pair(root)
    cfg = CollectConfig(
        base_model=base,
        finetuned_model=finetuned,
        layer=3,
        site="resid_post",
        dataset=texts,
        n_tokens=10**9,
        seq_len=128,
        seqs_per_batch=64,
        seqs_per_shard=512,
    )
    pair = load_model_pair(base, finetuned)
    traced = TracedPair(pair, cfg.site, cfg.layer)
    batches = [
        traced.pad(list(chunk))
        for chunk in np.array_split(
            np.array(list(tokenize(texts, pair.tokenizer, 128)), dtype=object), len(texts) // 64
        )
    ]
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, mask, pos in batches:
            for model in (pair.base, pair.finetuned):
                model(input_ids=ids, attention_mask=mask, position_ids=pos)
    plain = time.perf_counter() - start
    n_real = sum(int(mask.sum()) for _, mask, _ in batches)
    start = time.perf_counter()
    store = collect_activations(cfg, root / "store", pair=pair)
    ours = time.perf_counter() - start
    print(
        f"collection: {len(store):,} stored tokens ({n_real:,} real tokens incl. BOS), "
        "d_model 256, 4 layers, site layer 3"
    )
    print(f"  plain transformers forward, both models: {n_real / plain:10,.0f} tok/s")
    print(
        f"  collect_activations (trace + store):     {n_real / ours:10,.0f} tok/s   "
        f"ratio {plain / ours:.2f}x (target >= 0.90)"
    )


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_reading(root: Path, n=400_000, n_models=2, d_model=256, tokens_per_batch=4096, n_batches=60):
    acts = np.random.default_rng(0).normal(size=(n, n_models, d_model)).astype(np.float32)
    store = ActivationStore.from_arrays(root / "read_store", acts, val_fraction=0.0)
    raw = np.lib.format.open_memmap(root / "raw.npy", mode="w+", dtype=np.float32, shape=acts.shape)
    raw[:] = acts
    raw.flush()
    del acts
    rng = np.random.default_rng(1)

    def memmap_pass():
        for _ in range(n_batches):
            torch.from_numpy(raw[np.sort(rng.integers(0, n, tokens_per_batch))])

    def store_pass(store):
        for _ in zip(range(n_batches), store.batches(tokens_per_batch, seed=int(rng.integers(1000)))):
            pass

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(2)
    try:  # a fresh streamed store each time: every pass downloads its shards
        runs = (
            memmap_pass,
            lambda: store_pass(store),
            lambda: store_pass(ActivationStore(f"http://127.0.0.1:{port}/read_store")),
        )
        memmap, ours, streamed = (min(timed(run) for _ in range(3)) for run in runs)
    finally:
        server.terminate()
    tokens = n_batches * tokens_per_batch
    print(f"reading: {n:,} rows of [{n_models}, {d_model}] float32, batches of {tokens_per_batch}")
    print(f"  raw numpy memmap, random rows:      {tokens / memmap:12,.0f} tok/s")
    print(
        f"  ActivationStore.batches():          {tokens / ours:12,.0f} tok/s   "
        f"ratio {memmap / ours:.2f}x (target >= 0.50)"
    )
    print(f"  the same, streamed over HTTP:       {tokens / streamed:12,.0f} tok/s   ratio {memmap / streamed:.2f}x")


if __name__ == "__main__":
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bench_collection(Path(tmp))
        bench_reading(Path(tmp))

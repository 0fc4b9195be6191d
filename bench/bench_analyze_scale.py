"""What 04 costs at Gemma-2-2B size, on a GPU: its parts measured on a model pair of Gemma-2-2B's shape
(random weights, bf16: the cost does not depend on the weights) and crosscoders on its d_model.

1. ``analysis.encode``, the one pass over the held-out split that every statistic reads, for a 16k and a
   65k dictionary (relu, its encoder bias set for L0 about 100), with bf16 autocast.
2. The per-token KL (``analysis.token_divergence``'s loop body: each model's logits through nnsight, then
   the KL of the float32 next-token distributions), per held-out token, at 1024-token documents.
The spliced-in loss runs 2 site passes and 6 full forwards per evaluated token (3 per model), so its cost
is about 3 times the KL pass's per token, on ``n_eval_sequences`` documents.

Run (a CUDA machine): python bench/bench_analyze_scale.py
"""

import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from crosscoder_utils import ActivationStore, CrossCoder, CrossCoderConfig
from crosscoder_utils import analysis as A
from crosscoder_utils.collect import TracedPair
from crosscoder_utils.models import ModelPair

GEMMA_2_2B = dict(
    vocab_size=256_000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timed(function):
    sync = torch.cuda.synchronize if DEVICE == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    result = function()
    sync()
    return result, time.perf_counter() - start


def bench_encode(n_tokens: int = 200_000) -> None:
    d = GEMMA_2_2B["hidden_size"]
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        x = torch.randn(n_tokens, 2, d, generator=g, dtype=torch.bfloat16)
        store = ActivationStore.from_arrays(f"{root}/store", x, val_fraction=0.9, dtype="bfloat16")
        for dict_size in (16_384, 65_536):
            torch.manual_seed(0)
            cc = CrossCoder(CrossCoderConfig(d_model=d, n_models=2, dict_size=dict_size))
            with torch.no_grad():  # an encoder bias that leaves about 100 latents active per token
                sample = torch.einsum("bmd,mdl->bl", store.read(np.arange(n_tokens - 2048, n_tokens)), cc.W_enc)
                cc.b_enc.copy_(-sample.kthvalue(int(2048 * (1 - 100 / dict_size)), dim=0).values)
            A.encode(cc, store, torch.ones(2), max_tokens=8192, device=DEVICE)  # warm-up
            encoded, seconds = timed(lambda cc=cc: A.encode(cc, store, torch.ones(2), device=DEVICE))
            print(
                f"encode, dict {dict_size:,}: {encoded.n_tokens / seconds:,.0f} held-out tokens/s "
                f"(L0 {encoded.l0:.0f}, {encoded.n_tokens:,} tokens in {seconds:.1f} s)",
                flush=True,
            )


@torch.no_grad()
def bench_kl(seq_len: int = 1024, n_batches: int = 3) -> None:
    config = transformers.Gemma2Config(**GEMMA_2_2B)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.device(DEVICE):
            models.append(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval())
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=1)
    traced = TracedPair(ModelPair(*models, tokenizer, ("base", "finetuned")), "resid_post", 13)
    for seqs_per_batch in (4, 16):
        sequences = torch.randint(2, config.vocab_size, (seqs_per_batch, seq_len)).tolist()
        ids, mask, pos = traced.pad(sequences)

        def kl(ids=ids, mask=mask, pos=pos):
            logps = [F.log_softmax(traced.logits(m, ids, mask, pos).float(), -1) for m in (0, 1)]
            return (logps[1].exp() * (logps[1] - logps[0])).sum(-1)

        try:
            kl()  # warm-up
            torch.cuda.reset_peak_memory_stats() if DEVICE == "cuda" else None
            seconds = sum(timed(kl)[1] for _ in range(n_batches))
        except torch.OutOfMemoryError:
            print(f"per-token KL, {seqs_per_batch} documents a batch: out of GPU memory", flush=True)
            torch.cuda.empty_cache()
            continue
        tokens = n_batches * seqs_per_batch * seq_len
        print(
            f"per-token KL, {seqs_per_batch} documents of {seq_len} a batch: {tokens / seconds:,.0f} held-out "
            f"tokens/s, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30 if DEVICE == 'cuda' else 0:.0f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", flush=True)
    bench_encode()
    bench_kl()

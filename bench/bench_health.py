"""What the dictionary-health measures cost, side by side with what they guard, on this machine.

* The non-finite check: each training step keeps the first step whose loss is not finite in a device tensor
  (``torch.isfinite`` on the loss and a ``torch.where``, no host sync), against the training step itself
  (``CrossCoder.losses``, backward, fused Adam) at the organism's shape and a larger one. Target: under 1 %.
* ``dictionary_health`` (dead latents, duplicate groups by firing overlap and decoder cosine) on encoded
  held-out tokens, against the ``encode`` pass it reads.

Run: .venv/bin/python bench/bench_health.py
"""

import time

import torch

from crosscoder_utils import ActivationStore, CrossCoder, CrossCoderConfig
from crosscoder_utils.analysis.encoding import encode
from crosscoder_utils.analysis.health import dictionary_health


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def step_and_check(batch: int, d_model: int, dict_size: int) -> tuple[float, float]:
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=d_model, n_models=2, dict_size=dict_size)).train()
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 2, d_model)
    out = cc.losses(x)
    first_bad = torch.tensor(-1)

    def step():
        loss = cc.losses(x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def check():
        torch.where(torch.isfinite(out.loss.detach()) | (first_bad >= 0), first_bad, 7)

    return seconds(step, 5), seconds(check, 1000)


def main():
    threads = torch.get_num_threads()
    print(f"CPU, {threads} threads")
    print(f"{'shape (batch, d_model, dict)':<30} {'step ms':>9} {'check ms':>9} {'check / step':>13}")
    for shape in ((1024, 128, 256), (4096, 512, 16384)):
        step, check = step_and_check(*shape)
        print(f"{str(shape):<30} {step * 1e3:>9.2f} {check * 1e3:>9.4f} {check / step:>13.3%}")
    print(f"\n{'held-out tokens, dict':<30} {'encode s':>9} {'health s':>9} {'health / encode':>16}")
    for n_tokens, d_model, dict_size in ((10_000, 128, 256), (100_000, 512, 16384)):
        store = ActivationStore.from_arrays(
            f"/tmp/bench_health_{n_tokens}", torch.randn(n_tokens, 2, d_model), val_fraction=0.99
        )
        cc = CrossCoder(CrossCoderConfig(d_model=d_model, n_models=2, dict_size=dict_size)).eval()
        with torch.no_grad():  # a bias that gives a trained dictionary's L0: 10 of 256, 64 of 16,384
            pre = cc.pre_activations(store.read(range(1000)))
            cc.b_enc -= pre.quantile(1 - (10 if dict_size == 256 else 64) / dict_size, dim=0)
        start = time.perf_counter()
        encoded = encode(cc, store, torch.ones(2))
        encoding = time.perf_counter() - start
        start = time.perf_counter()
        health = dictionary_health(cc, encoded)
        measuring = time.perf_counter() - start
        print(
            f"{f'{n_tokens:,}, {dict_size:,} (L0 {encoded.l0:.0f})':<30} {encoding:>9.2f} {measuring:>9.2f}"
            f" {measuring / encoding:>16.2f}   ({len(health.dead)} dead, {len(health.groups)} groups)"
        )


if __name__ == "__main__":
    main()

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
import torch
import transformers
from conftest import TEXTS

from crosscoder_utils import ActivationStore, CollectConfig, collect_activations
from crosscoder_utils.collect import tokenize
from crosscoder_utils.organism import train_tokenizer

# written out here, independently of models.ARCHITECTURES; Gemma-2's and Gemma-3's branches pass through a post-norm
BRANCH = {
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
    "llama": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "gemma2": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("model.layers", "post_attention_layernorm", "post_feedforward_layernorm"),
}


def reference(model_dir, site, layer, texts, tokenizer):
    """Each sequence alone through plain transformers (no padding): {(seq, pos): activation}."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    blocks, attn, mlp = BRANCH[model.config.model_type]
    branch = {"attn_out": attn, "mlp_out": mlp}.get(site)
    captured = {}
    if branch:
        module = model.get_submodule(f"{blocks}.{layer}.{branch}")
        module.register_forward_hook(lambda m, i, o: captured.update(value=o[0] if isinstance(o, tuple) else o))
    out = {}
    for seq, ids in enumerate(tokenize(texts, tokenizer, 24)):
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        value = captured["value"] if branch else hidden[layer + (site == "resid_post")]
        for pos in range(len(ids)):
            out[seq, pos] = value[0, pos]
    return out


@pytest.mark.parametrize(
    "arch,site,layer,padding_side",
    [
        ("gpt2", "resid_post", 0, "left"),
        ("gpt2", "resid_pre", 1, "right"),
        ("gpt2", "mlp_out", 1, "left"),
        ("gpt_neox", "attn_out", 0, "right"),
        ("gpt_neox", "resid_post", 0, "left"),
        ("llama", "resid_pre", 1, "left"),
        ("llama", "mlp_out", 0, "right"),
        ("llama", "attn_out", 1, "left"),
        ("qwen2", "resid_post", 0, "left"),
        ("gemma2", "resid_pre", 1, "left"),
        ("gemma2", "mlp_out", 0, "right"),
        ("gemma3_text", "resid_post", 0, "right"),
        ("gemma3_text", "attn_out", 0, "left"),
    ],
)
def test_store_equals_plain_forward(make_model, tokenizer, tmp_path, arch, site, layer, padding_side):
    base, finetuned = make_model(arch, seed=0), make_model(arch, seed=1)
    cfg = CollectConfig(
        base_model=base,
        finetuned_model=finetuned,
        site=site,
        layer=layer,
        dataset=TEXTS,
        n_tokens=10**6,
        seq_len=24,
        seqs_per_batch=8,
        seqs_per_shard=16,
        padding_side=padding_side,
    )
    store = collect_activations(cfg, tmp_path / "store")
    assert store.meta["site"] == site and store.meta["n_models"] == 2 and store.meta["d_model"] == 32
    seq, pos = store.positions(np.arange(len(store)))
    acts, token_ids = store.read(np.arange(len(store))), store.token_ids(np.arange(len(store)))
    # every non-pad, non-BOS token exactly once
    sequences = list(tokenize(TEXTS, tokenizer, 24))
    expected = {(s, p) for s, ids in enumerate(sequences) for p in range(len(ids)) if ids[p] != tokenizer.bos_token_id}
    got = list(zip(seq.tolist(), pos.tolist()))
    assert len(got) == len(set(got)) and set(got) == expected
    assert all(token_ids[i] == sequences[s][p] for i, (s, p) in enumerate(got))
    for model_index, model_dir in enumerate((base, finetuned)):
        ref = reference(model_dir, site, layer, TEXTS, tokenizer)
        expected_acts = torch.stack([ref[key] for key in got])
        torch.testing.assert_close(acts[:, model_index], expected_acts, atol=1e-5, rtol=1e-5)
    assert not torch.equal(acts[:, 0], acts[:, 1])


def test_exclusions_and_chat_messages(make_model, tokenizer, tmp_path):
    chats = [[{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}] for text in TEXTS[:20]]
    datasets.Dataset.from_dict({"messages": chats}).save_to_disk(str(tmp_path / "chats"))
    user, end = tokenizer.convert_tokens_to_ids(["<|user|>", "<|end|>"])
    cfg = CollectConfig(
        base_model=make_model(),
        finetuned_model=make_model(seed=1),
        layer=0,
        dataset=str(tmp_path / "chats"),
        text_column="messages",
        n_tokens=10**6,
        seq_len=128,
        seqs_per_batch=4,
        seqs_per_shard=8,
        exclude_first_n=2,
        exclude_token_ids=[end],
    )
    store = collect_activations(cfg, tmp_path / "store")
    ids = store.token_ids(np.arange(len(store)))
    _, pos = store.positions(np.arange(len(store)))
    assert pos.min() >= 2 and end not in ids.tolist() and tokenizer.bos_token_id not in ids.tolist()
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids.tolist()
    assert user not in ids.tolist()  # always at position 1, so excluded by exclude_first_n


def test_n_tokens_stops_exactly_and_dtypes_roundtrip(make_model, tmp_path):
    cfgs = {
        dtype: CollectConfig(
            base_model=make_model(),
            finetuned_model=make_model(seed=1),
            layer=1,
            dataset=TEXTS,
            n_tokens=300,
            seq_len=24,
            seqs_per_batch=4,
            seqs_per_shard=8,
            dtype=dtype,
        )
        for dtype in ("float32", "float16", "bfloat16")
    }
    stores = {dtype: collect_activations(cfg, tmp_path / dtype) for dtype, cfg in cfgs.items()}
    exact = stores["float32"].read(np.arange(300))
    for dtype, store in stores.items():
        assert len(store) == 300 and store.meta["dtype"] == dtype
        assert torch.equal(store.read(np.arange(300)), exact.to(getattr(torch, dtype)).float())


COLLECT_SCRIPT = """
import sys
from crosscoder_utils import CollectConfig, collect_activations
from conftest import TEXTS
cfg = CollectConfig(base_model=sys.argv[1], finetuned_model=sys.argv[2], layer=1, dataset=TEXTS * 40,
                    n_tokens=int(sys.argv[4]), seq_len=24, seqs_per_batch=4, seqs_per_shard=8)
collect_activations(cfg, sys.argv[3])
"""


def assert_same_store(a: ActivationStore, b: ActivationStore):
    rows = np.arange(len(b))
    assert len(a) == len(b) and a.meta["n_shards"] == b.meta["n_shards"]
    assert torch.equal(a.read(rows), b.read(rows)) and torch.equal(a.token_ids(rows), b.token_ids(rows))
    assert all(torch.equal(x, y) for x, y in zip(a.positions(rows), b.positions(rows)))
    assert a.meta["mean_norm"] == pytest.approx(b.meta["mean_norm"], rel=1e-9)


def test_killed_collection_resumes_to_the_same_store_with_two_processes(make_model, tmp_path):
    """Killed single-process, resumed under torchrun with 2 processes (gloo): the single-process store."""
    base, finetuned = make_model(), make_model(seed=1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(__file__)]), "TQDM_DISABLE": "1"}
    (tmp_path / "collect.py").write_text(COLLECT_SCRIPT)
    command = lambda name, n_tokens, processes=1: (
        (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
            if processes > 1
            else [sys.executable]
        )
        + [str(tmp_path / "collect.py"), base, finetuned, str(tmp_path / name), str(n_tokens)]
    )
    proc = subprocess.Popen(command("killed", 10**6), env=env)
    while not (tmp_path / "killed/shards/shard_00003").exists():
        assert proc.poll() is None, "the collection ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/meta.json").exists()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        ActivationStore(tmp_path / "killed")
    subprocess.run(command("killed", 10**6, processes=2), env=env, check=True)
    subprocess.run(command("whole", 10**6), env=env, check=True)
    assert_same_store(ActivationStore(tmp_path / "killed"), ActivationStore(tmp_path / "whole"))
    # a token budget that ends inside a round of blocks: the crossing block is cut where one process cuts it
    for name, processes in (("budget_1", 1), ("budget_2", 2)):
        subprocess.run(command(name, 301, processes), env=env, check=True)
    assert len(ActivationStore(tmp_path / "budget_1")) == 301
    assert_same_store(ActivationStore(tmp_path / "budget_2"), ActivationStore(tmp_path / "budget_1"))


def test_bad_inputs_are_refused_before_compute(make_model, tokenizer, tmp_path):
    base = make_model()

    def collect(**kw):
        cfg = CollectConfig(
            **{
                "base_model": base,
                "finetuned_model": make_model(seed=1),
                "layer": 1,
                "dataset": TEXTS,
                "n_tokens": 100,
                "seq_len": 24,
                "seqs_per_batch": 4,
                "seqs_per_shard": 8,
                **kw,
            }
        )
        return collect_activations(cfg, tmp_path / "store")

    other_tok = train_tokenizer(["completely different words here"] * 50, vocab_size=300)
    other = tmp_path / "other_tokenizer"
    transformers.AutoModelForCausalLM.from_pretrained(base).save_pretrained(other)
    other_tok.save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizers of .*other_tokenizer.* differ"):
        collect(finetuned_model=str(other))
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.1"):
        collect(layer=2)
    with pytest.raises(ValueError, match="resid_pre"):
        collect(site="resid_middle")
    with pytest.raises(ValueError, match="neither one of"):
        collect(site="transformer.h.9.mlp")
    with pytest.raises(ValueError, match="width 32 .* has 48"):
        collect(finetuned_model=make_model(d=48))
    with pytest.raises(ValueError, match="yields no tokens"):
        collect(dataset=["", ""])
    with pytest.raises(ValueError, match="must be a multiple of seqs_per_batch"):
        collect(seqs_per_shard=6)
    cfg = CollectConfig(base_model="no/such-model", finetuned_model="no/such-model", dataset=TEXTS)
    with pytest.raises(ValueError, match="stores are written on local disk, not to memory://store"):
        collect_activations(cfg, "memory://store")  # refused before the (here impossible) model loading
    assert not (tmp_path / "store").exists()
    nan_model = tmp_path / "nan_model"
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias.fill_(float("nan"))
    model.save_pretrained(nan_model)
    tokenizer.save_pretrained(nan_model)
    with pytest.raises(ValueError, match="non-finite"):
        collect(finetuned_model=str(nan_model))
    assert not (tmp_path / "store/meta.json").exists()
    (tmp_path / "store").rename(tmp_path / "nan_store")
    good = collect()
    before = good.read(np.arange(len(good)))
    with pytest.raises(ValueError, match=r"other settings \(differing: \['layer'\]\)"):
        collect(layer=0)
    assert torch.equal(ActivationStore(tmp_path / "store").read(np.arange(len(good))), before)


def test_from_arrays_and_batches(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(10_000, 3, 8)).astype(np.float32)
    store = ActivationStore.from_arrays(
        tmp_path / "s", acts, token_ids=np.arange(10_000), shard_size=3000, val_fraction=0.1, site="resid_post"
    )
    assert store.meta["n_models"] == 3 and len(store) == 10_000 and store.meta["site"] == "resid_post"
    assert torch.equal(store.read([5, 2, 9999]), torch.from_numpy(acts[[5, 2, 9999]]))
    assert store.token_ids([7]).item() == 7
    np.testing.assert_allclose(store.meta["mean"], acts.mean(0), atol=1e-6)

    lookup = {tuple(acts[i, 0, :2]): i for i in range(len(acts))}
    passes = [
        [lookup[tuple(row[0, :2].tolist())] for b in store.batches(64, seed=s) for row in b.numpy()] for s in (0, 0, 1)
    ]
    assert passes[0] == passes[1] and passes[0] != passes[2]
    assert len(passes[0]) == len(set(passes[0])) == (9000 // 64) * 64 and max(passes[0]) < 9000
    val = [lookup[tuple(row[0, :2].tolist())] for b in store.batches(100, split="val") for row in b.numpy()]
    assert sorted(val) == list(range(9000, 10_000))
    later = [lookup[tuple(row[0, :2].tolist())] for b in store.batches(64, start_batch=5) for row in b.numpy()]
    assert later == passes[0][5 * 64 :]
    with pytest.raises(ValueError, match="holds an activation store made with other settings"):
        ActivationStore.from_arrays(tmp_path / "s", acts[:5])

    meta = json.loads((tmp_path / "s/meta.json").read_text())
    assert [shard[:2] for shard in meta["shards"]] == [[f"shard_{b:05d}", 3000 if b < 3 else 1000] for b in range(4)]
    shutil.rmtree(tmp_path / "s/shards/shard_00002")
    with pytest.raises(ValueError, match="should hold 4 shards of 10000 rows"):
        ActivationStore(tmp_path / "s")
    with pytest.raises(ValueError, match=r"must be \[n_tokens > 0, n_models, d_model\]"):
        ActivationStore.from_arrays(tmp_path / "t", acts[:, 0])

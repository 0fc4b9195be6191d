"""Faults, bad input and changed input: a clear error before compute is spent (naming the file, step or
setting), and nothing already written changed or lost."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from crosscoder_utils import (
    ActivationStore,
    CollectConfig,
    CrossCoderConfig,
    TrainConfig,
    collect_activations,
    estimate_norm_factors,
    train_crosscoder,
)
from crosscoder_utils.files import fingerprint
from crosscoder_utils.normalize import load_norm_factors
from crosscoder_utils.run import load_run


def tree(path) -> dict:
    """{file: (size, sha256)} of everything under ``path``: what must not change."""
    return fingerprint(path)


def flip_a_byte(store, shard: str) -> None:
    """One flipped byte inside a shard's activations, as a failing disk leaves it."""
    data = next(Path(store.path, "shards", shard).glob("*.arrow"))
    raw = bytearray(data.read_bytes())
    raw[-200] ^= 0xFF
    data.write_bytes(bytes(raw))


@pytest.fixture
def store(tmp_path):
    x = torch.randn(4000, 2, 16) * torch.tensor([1.0, 3.0])[None, :, None]
    store = ActivationStore.from_arrays(tmp_path / "store", x, shard_size=1000)
    estimate_norm_factors(store, n_batches=4, tokens_per_batch=512)
    return store


CFG = dict(tokens_per_step=256, train_tokens=40 * 256, save_every=10, log_every=5, log_to="none")
CC = CrossCoderConfig(dict_size=64)


def test_a_float16_overflow_is_refused_before_the_shard_is_written(tmp_path):
    x = torch.randn(100, 2, 8)
    x[50, 1, 3] = 1e5  # above float16's 65,504
    with pytest.raises(
        ValueError,
        match=r"float16 at sequence 50 .*\(for arrays: row 50\), model 1 .*1e\+05.*float16 holds at most 65,504",
    ):
        ActivationStore.from_arrays(tmp_path / "s", x, dtype="float16")
    assert not (tmp_path / "s").exists()  # every row is checked before anything is written


def test_a_corrupt_shard_is_caught_by_its_checksum(store):
    flip_a_byte(store, "shard_00002")
    before = tree(store.path)
    with pytest.raises(ValueError, match=r"shard shard_00002 of the store at .* is corrupt"):
        ActivationStore(store.path, verify=True)
    assert tree(store.path) == before


def edit_shard(store, shard: str, edit) -> None:
    """Shard ``shard``'s data file written again with ``edit`` (table -> table) applied, as a hand or a tool would."""
    data = next(Path(store.path, "shards", shard).glob("*.arrow"))
    table = edit(pa.ipc.open_stream(pa.py_buffer(data.read_bytes())).read_all())
    with pa.OSFile(str(data), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def edit_meta(store, edit) -> None:
    meta = json.loads(Path(store.path, "meta.json").read_text())
    edit(meta)
    Path(store.path, "meta.json").write_text(json.dumps(meta))


def test_a_meta_json_dtype_that_is_not_the_shards_is_refused_on_opening_naming_the_shard(store):
    edit_meta(store, lambda meta: meta.update(dtype="float16"))
    with pytest.raises(ValueError, match=r"shard shard_00000 of .* holds float values, but meta.json's dtype float16"):
        ActivationStore(store.path)


def test_a_row_count_raised_in_meta_json_and_the_shard_is_refused_on_opening_naming_the_shard(store):
    def raise_count(meta):
        meta["shards"][3][1] += 10
        meta["n_tokens"] += 10

    edit_meta(store, raise_count)
    with pytest.raises(ValueError, match=r"shard shard_00003 of .* holds 1000 rows, but meta.json lists 1010"):
        ActivationStore(store.path, verify=True)


def test_two_shards_swapped_by_name_are_refused_at_their_first_read(store):
    shards = Path(store.path, "shards")
    os.rename(shards / "shard_00001", shards / "swap")
    os.rename(shards / "shard_00002", shards / "shard_00001")
    os.rename(shards / "swap", shards / "shard_00002")
    swapped = ActivationStore(store.path)  # of equal size: their headers agree with meta.json
    with pytest.raises(ValueError, match=r"shard shard_00001 of .* is corrupt .*another shard's files under its name"):
        swapped.read(np.arange(1000, 1010))


def test_a_fresh_run_on_a_shard_with_corrupted_positions_is_refused_naming_it(store, tmp_path):
    def corrupt(table):  # 64 bytes: 16 int32 positions
        pos = table.column("pos").to_numpy().copy()
        pos[:16] += 7
        return table.set_column(table.schema.get_field_index("pos"), "pos", pa.array(pos))

    edit_shard(store, "shard_00002", corrupt)
    with pytest.raises(ValueError, match=r"shard shard_00002 of the store at .* is corrupt"):
        train_crosscoder(TrainConfig(**CFG), ActivationStore(store.path), tmp_path / "run", CC)
    assert not (tmp_path / "run/crosscoder.safetensors").exists()


@pytest.mark.parametrize("option", [{"val_fraction": 0.5}, {"dtype": "bfloat16"}, {"models": ["a", "b"]}])
def test_the_same_arrays_written_again_with_other_options_are_refused(tmp_path, option):
    x = torch.randn(4000, 2, 16) * torch.tensor([1.0, 3.0])[None, :, None]
    first = ActivationStore.from_arrays(tmp_path / "arrays", x, shard_size=1000)
    before = tree(first.path)
    with pytest.raises(ValueError, match="holds an activation store made with other settings"):
        ActivationStore.from_arrays(tmp_path / "arrays", x, shard_size=1000, **option)
    assert tree(first.path) == before


@pytest.mark.parametrize("where", ["the store's folder", "a folder of other files"])
def test_overwrite_never_deletes_what_is_not_a_run(store, tmp_path, where):
    run_dir = Path(store.path) if where == "the store's folder" else tmp_path / "notes"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "analysis.ipynb").write_text("{}")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="holds the store it trains on|holds files but no run"):
        train_crosscoder(TrainConfig(**CFG, overwrite=True), store, run_dir, CC)
    assert tree(tmp_path) == before


def test_a_resume_on_a_store_whose_split_was_edited_is_refused(store, tmp_path):
    train_crosscoder(TrainConfig(**CFG), store, tmp_path / "run", CC)
    (tmp_path / "run/crosscoder.safetensors").unlink()  # as a run killed after its checkpoint leaves it
    edit_meta(store, lambda meta: meta.update(val_fraction=0.5))
    with pytest.raises(ValueError, match="val_fraction"):
        train_crosscoder(TrainConfig(**CFG, resume=True), ActivationStore(store.path), tmp_path / "run", CC)


@pytest.mark.parametrize("factors", [[float("nan"), 1.0], [0.0, 1.0], [-1.0, 1.0], [1.0]])
def test_bad_norm_factors_are_refused_naming_norm_json(store, tmp_path, factors):
    store.write_json("norm.json", {"norm_factors": factors})
    with pytest.raises(ValueError, match=r"norm.json must hold one finite, positive factor per model \(2\)"):
        load_norm_factors(store)
    with pytest.raises(ValueError, match="norm.json must hold"):
        train_crosscoder(TrainConfig(**CFG), store, tmp_path / "run", CC)
    assert not (tmp_path / "run").exists()


def test_an_all_zero_model_gets_no_factor(tmp_path):
    x = torch.randn(2000, 2, 8)
    x[:, 1] = 0
    store = ActivationStore.from_arrays(tmp_path / "s", x)
    with pytest.raises(ValueError, match="the norm factors estimated from .* must hold one finite, positive"):
        estimate_norm_factors(store, n_batches=2, tokens_per_batch=256)
    assert store.read_json("norm.json") is None


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(store, tmp_path):
    for name in ("whole", "killed"):
        train_crosscoder(TrainConfig(**CFG), store, tmp_path / name, CC)
    killed = tmp_path / "killed"
    (killed / "crosscoder.safetensors").unlink()  # as if killed after the last checkpoint, before the export
    checkpoints = sorted((killed / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_0000020", "step_0000030"]  # the two newest are kept
    weights = load_file(checkpoints[-1] / "crosscoder.safetensors")
    weights["W_dec"][0, 0, 0] = float("nan")
    save_file(weights, checkpoints[-1] / "crosscoder.safetensors")
    with pytest.warns(UserWarning, match=r"checkpoint .*step_0000030 cannot be used \(non-finite weights\)"):
        train_crosscoder(TrainConfig(**CFG, resume=True), store, killed, CC)
    resumed, whole = (load_file(tmp_path / name / "crosscoder.safetensors") for name in ("killed", "whole"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_divergence_stops_the_run_naming_the_step_and_keeps_the_checkpoint(store, tmp_path):
    run_dir = tmp_path / "run"
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}), store, run_dir, CC)
    (run_dir / "crosscoder.safetensors").unlink()
    checkpoint = run_dir / "checkpoints/step_0000010"
    states = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for moments in states["optimizer"]["state"].values():
        moments["exp_avg"].fill_(float("nan"))  # a fault in the optimizer state: the next step writes NaN weights
    torch.save(states, checkpoint / "optimizer.pt")
    kept = tree(checkpoint)
    with pytest.raises(
        FloatingPointError, match=r"the loss is not finite at step 12.*last good checkpoint .*step_0000010"
    ):
        train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}, resume=True), store, run_dir, CC)
    assert not (run_dir / "crosscoder.safetensors").exists() and tree(checkpoint) == kept


def poison(store: ActivationStore, row: int) -> None:
    """Write NaN into one value of a store row, in its shard's arrow file (as a disk or a script might)."""
    shard = Path(store.path) / "shards" / f"shard_{row // 1000:05d}"  # the fixture's shards hold 1,000 rows each
    (arrow,) = shard.glob("*.arrow")
    with pa.ipc.open_stream(pa.OSFile(str(arrow))) as reader:
        table = reader.read_all()
    acts = table.column("acts").combine_chunks()
    values = acts.flatten().to_numpy().copy()
    values[(row % 1000) * acts.type.list_size] = np.nan
    table = table.set_column(0, "acts", pa.FixedSizeListArray.from_arrays(pa.array(values), acts.type.list_size))
    with pa.ipc.new_stream(str(arrow), table.schema) as writer:
        writer.write_table(table)


def test_a_non_finite_row_written_after_the_store_was_checked_stops_the_run_at_its_step(store, tmp_path):
    ActivationStore(store.path, verify=True)
    poison(store, 1234)
    cfg = {**CFG, "save_every": 1000, "init": "random"}
    with pytest.raises(
        FloatingPointError, match=r"batch of step (\d+) holds .* row 1234 .*shard_00001, row 234 in it"
    ) as error:
        train_crosscoder(TrainConfig(**cfg), store, tmp_path / "run", CC)
    assert not (tmp_path / "run/crosscoder.safetensors").exists() and not (tmp_path / "run/raw").exists()
    step = int(re.search(r"step (\d+)", str(error.value)).group(1))
    train_crosscoder(TrainConfig(**{**cfg, "train_tokens": (step - 1) * 256}), store, tmp_path / "before", CC)
    assert (tmp_path / "before/crosscoder.safetensors").exists()  # the steps before it are finite


def test_norm_factors_of_a_store_with_a_non_finite_row_are_refused_naming_the_row(store):
    poison(store, 1234)  # after the fixture's store read and checked every shard
    before = tree(store.path)
    with pytest.raises(ValueError, match=r"not finite .* row 1234 .*shard_00001, row 234 in it.*collect the store"):
        estimate_norm_factors(store, n_batches=1, tokens_per_batch=3800)  # every training row
    assert tree(store.path) == before  # norm.json kept


def test_a_non_finite_row_in_the_data_init_sample_is_refused_naming_it(store, tmp_path):
    poison(store, 1234)  # the fixture's 3,800 training rows are all in the sample of 64 + 4,096
    with pytest.raises(FloatingPointError, match=r"sample of the data init holds .* row 1234 .*shard_00001"):
        train_crosscoder(TrainConfig(**CFG), store, tmp_path / "run", CC)
    assert not (tmp_path / "run/crosscoder.safetensors").exists()


def test_a_refused_run_writes_nothing_and_the_corrected_call_runs(store, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"training rows \(3800 tokens\) are fewer than one step \(4096 tokens\)"):
        train_crosscoder(TrainConfig(**{**CFG, "tokens_per_step": 4096}), store, run_dir, CC)
    with pytest.raises(ValueError, match="init='data' starts each of the 8192 latents from a sampled token"):
        train_crosscoder(TrainConfig(**CFG), store, run_dir, CrossCoderConfig(dict_size=8192))
    assert not run_dir.exists()
    train_crosscoder(TrainConfig(**CFG), store, run_dir, CC)  # no resume=True needed
    assert (run_dir / "crosscoder.safetensors").exists()


def test_a_norm_json_changed_mid_run_is_refused_on_resume(store, tmp_path):
    run_dir = tmp_path / "run"
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}), store, run_dir, CC)
    before = tree(run_dir)
    estimate_norm_factors(store, n_batches=2, tokens_per_batch=256, seed=5)
    with pytest.raises(ValueError, match=r"differing: \['norm_factors'\]"):
        train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}, resume=True), store, run_dir, CC)
    with pytest.raises(ValueError, match="norm factors of the store at .* are not those .* was trained with"):
        load_run(run_dir)
    assert tree(run_dir) == before


def test_a_run_whose_store_was_replaced_is_refused_by_load_run(store, tmp_path):
    run_dir = tmp_path / "run"
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 10 * 256}), store, run_dir, CC)
    other = ActivationStore.from_arrays(tmp_path / "other", torch.randn(5000, 2, 16))
    estimate_norm_factors(other, n_batches=2, tokens_per_batch=256)
    os.rename(store.path, tmp_path / "moved")
    os.rename(other.path, store.path)
    with pytest.raises(ValueError, match=r"holds a store made with other settings \(differing: .*n_tokens"):
        load_run(run_dir)


def collect_cfg(make_model, dataset, **fields):
    return CollectConfig(
        base_model=make_model("gpt2", seed=0),
        finetuned_model=make_model("gpt2", seed=1),
        dataset=dataset,
        n_tokens=3000,
        seq_len=32,
        seqs_per_batch=8,
        seqs_per_shard=16,
        layer=1,
        **fields,
    )


@pytest.fixture
def texts():
    from crosscoder_utils.organism import base_corpus

    return base_corpus(300, seed=3)


def test_a_model_changed_between_kill_and_resume_is_refused(make_model, texts, tmp_path):
    fine_tune = tmp_path / "ft"
    transformers.AutoModelForCausalLM.from_pretrained(make_model("gpt2", seed=1)).save_pretrained(fine_tune)
    transformers.AutoTokenizer.from_pretrained(make_model("gpt2", seed=1)).save_pretrained(fine_tune)
    cfg = collect_cfg(make_model, texts)
    cfg = CollectConfig.from_dict({**cfg.to_dict(), "finetuned_model": str(fine_tune)})
    store = collect_activations(cfg, tmp_path / "store")
    (Path(store.path) / "meta.json").unlink()  # as if killed after the last shard
    kept = tree(store.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(fine_tune)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    model.save_pretrained(fine_tune)
    with pytest.raises(ValueError, match=r"changed since it was collected: \['finetuned_model.model.safetensors'\]"):
        collect_activations(cfg, tmp_path / "store")
    assert tree(store.path) == kept


def test_every_token_excluded_is_caught_before_anything_is_written(make_model, texts, tmp_path):
    cfg = collect_cfg(make_model, texts, exclude_first_n=32)
    with pytest.raises(
        ValueError, match=r"every token of the first 8 sequences is excluded \(seq_len 32, .*first_n 32"
    ):
        collect_activations(cfg, tmp_path / "store")
    assert not (tmp_path / "store").exists()


LOCKED = """
import sys, time
import numpy as np, torch
from crosscoder_utils.store.writer import StoreWriter, arrays_settings
StoreWriter(sys.argv[1], arrays_settings(torch.ones(10, 2, 4), np.full(10, -1), 1, "float32", {}), 2, 4, "float32")
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCKED, str(tmp_path / "s")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        kept = tree(tmp_path / "s")
        with pytest.raises(RuntimeError, match=rf"is being written by process {holder.pid} \(lock file .*writer.lock"):
            ActivationStore.from_arrays(tmp_path / "s", torch.ones(10, 2, 4), shard_size=1)
        assert tree(tmp_path / "s") == kept
    finally:
        holder.kill()
        holder.wait()
    ActivationStore.from_arrays(tmp_path / "s", torch.ones(10, 2, 4), shard_size=1)  # the holder's lock is stale
    assert not (tmp_path / "s/writer.lock").exists()


@pytest.mark.parametrize("row", [4000, -1])
def test_a_row_outside_the_store_is_refused_naming_it(store, row):
    with pytest.raises(IndexError, match=rf"row {row} is outside the store at .*: its rows are 0 to 3999"):
        store.read([5, row])


def test_a_lock_file_that_holds_no_process_id_is_refused_naming_it(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s/writer.lock").write_text("abc")
    with pytest.raises(ValueError, match=r"lock file .*writer.lock holds 'abc', not a process id"):
        ActivationStore.from_arrays(tmp_path / "s", torch.ones(10, 2, 4), shard_size=1)


def test_a_run_whose_metrics_were_cut_is_refused_naming_the_file(store, tmp_path):
    train_crosscoder(TrainConfig(**CFG), store, tmp_path / "run", CC)
    metrics = tmp_path / "run/metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-20])
    with pytest.raises(ValueError, match=r"metrics.jsonl is not valid JSON .*the file is damaged"):
        load_run(tmp_path / "run")


def test_damaged_files_are_named(store):
    shard = next(Path(store.path, "shards/shard_00001").glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=r"shard shard_00001 of the store at .* cannot be read"):
        ActivationStore(store.path).read(np.arange(1000, 1010))
    meta = Path(store.path, "meta.json")
    meta.write_text(meta.read_text()[:50])
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON .*the file is damaged"):
        ActivationStore(store.path)


def test_the_spliced_loss_uses_the_val_documents_when_the_dataset_ran_out(make_model, texts, tmp_path):
    from crosscoder_utils import load_model_pair
    from crosscoder_utils.analysis import spliced_loss

    cfg = CollectConfig.from_dict({**collect_cfg(make_model, texts[:40]).to_dict(), "n_tokens": 100_000})
    with pytest.warns(UserWarning, match="the dataset ran out"):
        store = collect_activations(cfg, tmp_path / "store")
    estimate_norm_factors(store, n_batches=2, tokens_per_batch=256)
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 5 * 256}), store, tmp_path / "run", CC)
    run = load_run(tmp_path / "run")
    pair = load_model_pair(cfg.base_model, cfg.finetuned_model, device="cpu")
    results = spliced_loss(run.raw, pair, store, n_sequences=4)
    assert len(results) == 2 and all(r.ce_clean < r.ce_zero for r in results)


def test_a_refused_write_leaves_nothing_that_blocks_the_corrected_call(tmp_path):
    x = torch.randn(300, 2, 8)
    x[250, 0, 0] = float("nan")  # in the third shard
    with pytest.raises(ValueError, match=r"non-finite activations .* at sequence 250 .*\(for arrays: row 250\)"):
        ActivationStore.from_arrays(tmp_path / "s", x, shard_size=100)
    assert not (tmp_path / "s").exists()
    x[250, 0, 0] = 0.0
    assert len(ActivationStore.from_arrays(tmp_path / "s", x, shard_size=100)) == 300


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(dtype="int8"), r"dtype='int8' is not one of"),
        (dict(shard_size=0), r"shard_size must be > 0, got 0"),
        (dict(val_fraction=1.5), r"val_fraction must be in \[0, 1\), got 1.5"),
    ],
)
def test_bad_store_options_are_refused_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        ActivationStore.from_arrays(tmp_path / "s", torch.randn(100, 2, 8), **options)
    assert not (tmp_path / "s").exists()


def test_a_config_value_of_the_wrong_type_is_refused_naming_the_field():
    with pytest.raises(TypeError, match=r"seq_len must be int, got 32.5 \(float\)"):
        CollectConfig(seq_len=32.5)


def test_an_export_with_non_finite_weights_is_refused_at_load(store, tmp_path):
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 10 * 256}), store, tmp_path / "run", CC)
    weights = load_file(tmp_path / "run/crosscoder.safetensors")
    weights["W_enc"][0, 0, 0] = float("nan")
    save_file(weights, tmp_path / "run/crosscoder.safetensors")
    with pytest.raises(ValueError, match=r"crosscoder.safetensors holds non-finite weights"):
        load_run(tmp_path / "run")


@pytest.mark.parametrize("name", ["run.json", "cfg.json", "norm_factors.json", "crosscoder.safetensors"])
def test_a_damaged_run_file_is_named(store, tmp_path, name):
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 10 * 256}), store, tmp_path / "run", CC)
    path = tmp_path / "run" / name
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{name}.*damaged|cannot be read .*damaged"):
        load_run(tmp_path / "run")


def test_damaged_store_files_are_named(store):
    store.write_json("norm.json", {"factors": [1.0, 1.0]})
    with pytest.raises(ValueError, match=r"norm.json holds no list of numbers under 'norm_factors'"):
        load_norm_factors(store)
    store.write_json("norm.json", {"norm_factors": [1e30, 1e30]})
    with pytest.raises(ValueError, match=r"norm.json scales the store's mean activation norms .* not about 1"):
        load_norm_factors(store)
    meta = Path(store.path, "meta.json")
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "shards"}))
    with pytest.raises(ValueError, match=r"meta.json lacks \['shards'\]"):
        ActivationStore(store.path)


def test_a_resume_ignores_a_metrics_line_cut_short_and_a_checkpoint_of_another_shape(store, tmp_path):
    train_crosscoder(TrainConfig(**CFG), store, tmp_path / "whole", CC)
    killed = tmp_path / "killed"
    train_crosscoder(TrainConfig(**CFG), store, killed, CC)
    (killed / "crosscoder.safetensors").unlink()
    with (killed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4')  # a kill in the middle of a line
    other = train_crosscoder(
        TrainConfig(**{**CFG, "train_tokens": 10 * 256}), store, tmp_path / "small", CrossCoderConfig(dict_size=32)
    )
    other.save(killed / "checkpoints/step_0000030")  # the newest checkpoint now has another shape
    with pytest.warns(UserWarning, match=r"step_0000030 cannot be used"):
        train_crosscoder(TrainConfig(**CFG, resume=True), store, killed, CC)
    resumed, whole = (load_file(tmp_path / name / "crosscoder.safetensors") for name in ("killed", "whole"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert (killed / "metrics.jsonl").read_text() == (tmp_path / "whole/metrics.jsonl").read_text()


def test_a_second_trainer_is_refused_naming_the_first(store, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/train.lock").write_text(str(os.getppid()))  # a live process holds the run
    with pytest.raises(RuntimeError, match=rf"being written by process {os.getppid()}"):
        train_crosscoder(TrainConfig(**CFG), store, tmp_path / "run", CC)
    assert not (tmp_path / "run/run.json").exists()


def test_a_second_trainer_of_an_unfinished_run_is_refused_naming_the_first(store, tmp_path):
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}), store, tmp_path / "run", CC)
    (tmp_path / "run/crosscoder.safetensors").unlink()  # unfinished, and another process is at work on it
    (tmp_path / "run/train.lock").write_text(str(os.getppid()))
    with pytest.raises(RuntimeError, match=rf"being written by process {os.getppid()}"):
        train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}, resume=True), store, tmp_path / "run", CC)


def test_a_refused_resume_of_a_dead_run_leaves_its_lock_as_it_was(store, tmp_path):
    cfg = {**CFG, "train_tokens": 20 * 256}
    train_crosscoder(TrainConfig(**cfg), store, tmp_path / "run", CC)
    (tmp_path / "run/crosscoder.safetensors").unlink()  # unfinished: killed after its checkpoint
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # the run's trainer, gone since
    gone.wait()
    (tmp_path / "run/train.lock").write_text(str(gone.pid))
    before = tree(tmp_path / "run")
    with pytest.raises(ValueError, match=r"differing: \['train.lr'\]"):
        train_crosscoder(TrainConfig(**cfg, resume=True, lr=1e-3), store, tmp_path / "run", CC)
    assert tree(tmp_path / "run") == before  # the dead run's lock, not this process's: another may resume it
    train_crosscoder(TrainConfig(**cfg, resume=True), store, tmp_path / "run", CC)
    assert not (tmp_path / "run/train.lock").exists()


@pytest.mark.parametrize(
    "trained, edited, field",
    [
        ({"n_dedicated": 3}, {"n_dedicated": 0}, "n_dedicated is 0 there, but the weights have 3 latents per model"),
        ({}, {"n_dedicated": 3}, "n_dedicated is 3 there, but the weights have 0 latents per model"),
        ({"n_shared_latents": 4}, {"n_shared_latents": 2}, "n_shared_latents is 2 there, but the weights have 4"),
        ({}, {"variant": "batchtopk"}, "variant is 'batchtopk' there, but the weights hold no BatchTopK threshold"),
        ({"variant": "batchtopk"}, {"variant": "relu"}, "variant is 'relu' there, but the weights hold a BatchTopK"),
        ({}, {"d_model": "8"}, "d_model must be int | None, got '8' (str)): cfg.json"),
    ],
)
def test_a_cfg_json_that_does_not_match_the_weights_is_refused_naming_the_field(tmp_path, trained, edited, field):
    from crosscoder_utils import CrossCoder

    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=8, n_models=2, dict_size=32, k=4, **trained)).train()
    cc.encode(torch.randn(64, 2, 8))  # a batchtopk crosscoder learns its inference threshold in training
    cc.fold_norm_factors(torch.tensor([2.0, 0.5])).save(tmp_path)  # an export, in raw units
    CrossCoder.load(tmp_path)  # as saved: read
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **edited}))
    with pytest.raises(ValueError, match=re.escape(field)):
        CrossCoder.load(tmp_path)


def test_an_owner_name_whose_owner_is_a_local_folder_is_not_sent_to_the_hub(make_model, tmp_path, monkeypatch):
    from crosscoder_utils import load_model_pair

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mdl").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no such directory: mdl/bse \(its folder mdl/ is here"):
        load_model_pair("mdl/bse", make_model())


def test_a_resume_checks_the_store_against_its_checksums(store, tmp_path):
    train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}), store, tmp_path / "run", CC)
    (tmp_path / "run/crosscoder.safetensors").unlink()
    flip_a_byte(store, "shard_00001")
    with pytest.raises(ValueError, match=r"shard shard_00001 of the store at .* is corrupt"):
        train_crosscoder(TrainConfig(**{**CFG, "train_tokens": 20 * 256}, resume=True), store, tmp_path / "run", CC)


def test_finite_activations_whose_float32_norm_overflows_get_finite_norm_factors(tmp_path):
    x = torch.randn(2000, 2, 16)
    x[:, 1] *= 1e25  # finite in float32; its squared norm is not
    store = ActivationStore.from_arrays(tmp_path / "s", x)
    factors = estimate_norm_factors(store, n_batches=2, tokens_per_batch=256)
    assert torch.allclose(factors * torch.tensor(store.meta["mean_norm"]), torch.tensor(4.0), rtol=0.05)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda store: CrossCoderConfig(l1_coeff=float("inf")), r"l1_coeff must be >= 0, got inf"),
        (lambda store: estimate_norm_factors(store, n_batches=2.5), r"n_batches must be an integer > 0, got 2.5"),
        (
            lambda store: estimate_norm_factors(store, tokens_per_batch=100.5),
            r"tokens_per_batch must be an integer > 0, got 100.5",
        ),
        (lambda store: next(store.batches(0)), r"tokens_per_batch must be an integer > 0, got 0"),
    ],
)
def test_an_infinite_or_fractional_setting_is_refused_naming_it(store, call, message):
    with pytest.raises(ValueError, match=message):
        call(store)


@pytest.mark.parametrize(
    "call",
    [
        lambda path, tmp_path: estimate_norm_factors(path),
        lambda path, tmp_path: train_crosscoder(TrainConfig(**CFG), path, tmp_path / "run", CC),
    ],
)
def test_a_store_path_where_a_store_is_expected_is_refused_saying_how_to_open_it(store, tmp_path, call):
    with pytest.raises(TypeError, match=r"must be an ActivationStore \(ActivationStore\(path\) opens one\)"):
        call(store.path, tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_norm_json_holding_null_is_refused_as_damaged(store):
    Path(store.path, "norm.json").write_text("null")
    with pytest.raises(ValueError, match=r"norm.json holds null, not a JSON object: the file is damaged"):
        load_norm_factors(store)


@pytest.mark.parametrize(
    "progress, message", [("null", r"holds null, not a JSON object"), ('{"settings": {}}', r"lacks \['n_blocks'")]
)
def test_a_damaged_progress_json_is_refused_naming_it(tmp_path, progress, message):
    (tmp_path / "s").mkdir()
    (tmp_path / "s/progress.json").write_text(progress)
    with pytest.raises(ValueError, match=rf"progress.json {message}"):
        ActivationStore.from_arrays(tmp_path / "s", torch.randn(100, 2, 8))
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["progress.json"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda meta: meta.update(dtype="float64"), r"meta.json gives dtype 'float64', not one of"),
        (lambda meta: meta.pop("dtype"), r"meta.json lacks \['dtype'\]"),
        (lambda meta: meta.pop("val_fraction"), r"meta.json lacks \['val_fraction'\]"),
        (lambda meta: meta.pop("mean_norm"), r"meta.json lacks \['mean_norm'\]"),
    ],
)
def test_a_meta_json_lacking_a_field_or_naming_an_unknown_dtype_is_refused_on_opening(store, edit, message):
    edit_meta(store, edit)
    with pytest.raises(ValueError, match=message):
        ActivationStore(store.path)


def small_vocabulary_model(make_model, tokenizer, tmp_path) -> str:
    """The base's architecture with 150 fewer embedding rows than the tokenizer has tokens."""
    config = transformers.AutoConfig.from_pretrained(make_model())
    config.vocab_size = len(tokenizer) - 150
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")
    return str(tmp_path / "small")


@pytest.mark.parametrize(
    "fields, message",
    [
        (lambda m, t, p: {"seq_len": 200}, r"a sequence of 200 tokens is longer than .*'s 128 positions"),
        (lambda m, t, p: {"site": "transformer.h"}, r"site 'transformer.h' is a ModuleList .* never calls"),
        (
            lambda m, t, p: {"finetuned_model": small_vocabulary_model(m, t, p)},
            r"token id \d+ is past .*small'.s embedding \(\d+ rows\)",
        ),
        (
            lambda m, t, p: {"base_model": str(Path(m(), "config.json"))},
            r"config.json is a file, not a model directory",
        ),
    ],
)
def test_a_collection_its_models_cannot_run_is_refused_before_compute(
    make_model, tokenizer, texts, tmp_path, fields, message
):
    long_texts = [" ".join(texts[i : i + 10]) for i in range(0, 100, 10)]
    cfg = collect_cfg(make_model, long_texts).to_dict()
    cfg = CollectConfig.from_dict({**cfg, "seq_len": 128, **fields(make_model, tokenizer, tmp_path)})
    with pytest.raises(ValueError if "file" not in message else NotADirectoryError, match=message):
        collect_activations(cfg, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_split_the_saved_dataset_lacks_is_refused_naming_its_splits(make_model, texts, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(tmp_path / "data")
    cfg = collect_cfg(make_model, str(tmp_path / "data"), split="validation")
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['train'\]"):
        collect_activations(cfg, tmp_path / "store")

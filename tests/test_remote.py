"""Stores read from fsspec URLs: a real HTTP server on localhost, and fsspec's in-memory filesystem."""

import dataclasses
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import fsspec
import numpy as np
import pytest
import torch

from crosscoder_utils import ActivationStore, CrossCoderConfig, TrainConfig, estimate_norm_factors, train_crosscoder
from crosscoder_utils.hub import push_store
from crosscoder_utils.normalize import load_norm_factors


@pytest.fixture
def local_store(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(10_000, 2, 16)).astype(np.float32) * np.array([1.0, 3.0], dtype=np.float32)[:, None]
    store = ActivationStore.from_arrays(
        tmp_path / "store", acts, token_ids=rng.integers(0, 500, 10_000), shard_size=1000, val_fraction=0.1
    )
    estimate_norm_factors(store, n_batches=5, tokens_per_batch=256)
    return store


@pytest.fixture
def served(tmp_path):
    """Serves tmp_path over HTTP; yields (base URL, the paths of the GET requests so far)."""
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format, *args):
            requests.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_a_store_streamed_over_http_reads_and_trains_as_on_disk(local_store, served, tmp_path):
    url, requests = served
    remote = ActivationStore(
        f"{url}/store", window_rows=2500
    )  # windows of 3 shards; the cache holds 2 windows + 2 shards
    assert remote.meta == local_store.meta and len(remote) == 10_000
    rows = np.random.default_rng(1).permutation(10_000)[:700]
    assert torch.equal(remote.read(rows), local_store.read(rows))
    assert torch.equal(remote.token_ids(rows), local_store.token_ids(rows))
    assert all(torch.equal(a, b) for a, b in zip(remote.positions(rows), local_store.positions(rows)))

    requests.clear()
    remote, local = (ActivationStore(path, window_rows=2500) for path in (f"{url}/store", local_store.path))
    pairs = list(zip(remote.batches(64, seed=3), local.batches(64, seed=3), strict=True))
    assert len(pairs) == 9000 // 64 and all(torch.equal(a, b) for a, b in pairs)
    shards = lambda: sorted(int(r.split("/")[3][-5:]) for r in requests if r.endswith(".arrow"))
    row_of = {tuple(values): row for row, values in enumerate(local.read(np.arange(10_000))[:, 0, :2].tolist())}
    shards_of = lambda batches: sorted(
        {row_of[tuple(values)] // 1000 for batch in batches for values in batch[:, 0, :2].tolist()}
    )
    assert shards() == list(range(9))  # each train shard downloaded once, the val shard not at all

    requests.clear()  # a resumed pass downloads only the shards of the batches it reads
    later = list(ActivationStore(f"{url}/store", window_rows=2500).batches(64, seed=3, start_batch=100))
    assert all(torch.equal(a, b) for a, (b, _) in zip(later, pairs[100:], strict=True))
    assert shards() == shards_of(later) and len(shards()) < 9

    for rank in (0, 1):  # under torchrun a rank downloads only the shards holding its share of the batches
        requests.clear()
        share = list(ActivationStore(f"{url}/store", window_rows=2500).batches(64, seed=3, process=(rank, 2)))
        assert all(
            torch.equal(mine, whole[rank * 32 : (rank + 1) * 32]) for mine, (whole, _) in zip(share, pairs, strict=True)
        )
        assert shards() == shards_of(share) and len(shards()) < 9

    cfg = TrainConfig(
        tokens_per_step=128, train_tokens=128 * 30, lr=1e-3, log_to="none", log_every=10, save_every=100, seed=0
    )
    cc_cfg = CrossCoderConfig(dict_size=64, l1_coeff=1.0)
    streamed = train_crosscoder(cfg, remote, tmp_path / "streamed", cc_cfg).state_dict()
    on_disk = train_crosscoder(cfg, local, tmp_path / "on_disk", cc_cfg).state_dict()
    assert all(torch.equal(streamed[k], on_disk[k]) for k in on_disk)
    with pytest.raises(ValueError, match="store_identity"):  # another window size would shuffle other batches
        train_crosscoder(dataclasses.replace(cfg, resume=True), local_store, tmp_path / "on_disk", cc_cfg)


def test_a_store_on_a_writable_url_takes_its_norm_factors(local_store, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.put(f"{local_store.path}/shards", "/copy/shards", recursive=True)
    fs.put(f"{local_store.path}/meta.json", "/copy/meta.json")
    remote = ActivationStore("memory://copy")
    with pytest.raises(FileNotFoundError, match="run 02_normalize"):
        load_norm_factors(remote)
    factors = estimate_norm_factors(remote, n_batches=5, tokens_per_batch=256)
    assert torch.equal(factors, load_norm_factors(local_store)) and torch.equal(
        load_norm_factors(ActivationStore("memory://copy")), factors
    )

    with pytest.raises(ValueError, match="push_store uploads a local store"):
        push_store(remote, "me/acts")  # refused before any request to the Hub
    fs.rm("/copy/shards/shard_00004", recursive=True)
    with pytest.raises(FileNotFoundError, match="shard_00004 of the store at memory://copy is missing"):
        ActivationStore("memory://copy").read([4500])

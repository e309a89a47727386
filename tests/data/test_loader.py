"""The streaming loader: exactly-once epochs across DP ranks x workers, exact resume, blend weights,
a fixed validation stream and the documented behaviour when the DP size changes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from twotower.data.config import DataConfig
from twotower.data.loader import TokenLoader, build_train_loader, build_valid_loader
from twotower.data.shards import read_manifest
from twotower.data.stream import BlendSampler


def oracle_rows(path: Path, split: str = "train") -> list[bytes]:
    """Every sample of a split, read with plain webdataset (independent of the loader)."""
    man = read_manifest(path)
    urls = [str(path / s["name"]) for s in man["splits"][split]["shards"]]
    return [
        s["tokens.npy"].astype(np.int64).tobytes() for s in wds.WebDataset(urls, shardshuffle=False).decode()
    ]


def rows(batches) -> list[bytes]:
    return [r.numpy().tobytes() for b in batches for r in b["tokens"]]


def cfg(*paths, weights=None, **kw) -> DataConfig:
    weights = weights or [1.0] * len(paths)
    base = {"seq_len": 64, "num_workers": 2, "shuffle_buffer": 5, "seed": 7}
    base.update(kw)
    return DataConfig(train=[{"path": str(p), "weight": w} for p, w in zip(paths, weights)], **base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_one_epoch_every_sample_exactly_once(two_datasets):
    web, _ = two_datasets
    c = cfg(web)
    got = []
    for rank in range(2):
        got += rows(TokenLoader(c, dp_rank=rank, dp_size=2, micro_batch_size=3, one_pass=True))
    expected = oracle_rows(web)
    assert len(got) == len(expected)
    assert Counter(got) == Counter(expected)
    # and the order is shuffled, not the file order
    assert got != expected[: len(got)]


def test_ranks_see_disjoint_data_and_seed_changes_order(two_datasets):
    web, _ = two_datasets
    r0 = rows(take(build_train_loader(cfg(web), 0, 2, 4), 6))
    r1 = rows(take(build_train_loader(cfg(web), 1, 2, 4), 6))
    assert not set(r0) & set(r1)
    assert r0 == rows(take(build_train_loader(cfg(web), 0, 2, 4), 6))  # deterministic
    assert r0 != rows(take(build_train_loader(cfg(web), 0, 2, 4, seed=8), 6))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(two_datasets, num_workers):
    web, code = two_datasets
    c = cfg(web, code, weights=[0.7, 0.3], num_workers=num_workers)
    m = 6
    ref_loader = TokenLoader(c, dp_rank=1, dp_size=2, micro_batch_size=3)
    ref = take(ref_loader, 40 + m)
    # k = 1, 3 (mid-shard: 8 samples per shard), 7, 40 (past the first epoch of a slot)
    for k in (1, 3, 7, 40):
        first = TokenLoader(c, dp_rank=1, dp_size=2, micro_batch_size=3)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
        resumed = TokenLoader(c, dp_rank=1, dp_size=2, micro_batch_size=3)
        resumed.load_state_dict(state)
        got = take(resumed, m)
        for i in range(m):
            assert rows([got[i]]) == rows([ref[k + i]]), f"k={k}: batch {i} after resume differs"
            assert got[i]["loss_mask"].equal(ref[k + i]["loss_mask"])


def test_resume_past_epoch_boundary_covers_epochs(two_datasets):
    """Consuming a slot's stream over several epochs: each epoch of a slot is a permutation."""
    web, _ = two_datasets
    c = cfg(web, num_workers=0)
    loader = TokenLoader(c, 0, 1, 1)
    expected = Counter(oracle_rows(web))
    n = len(expected)
    seen = rows(take(loader, 2 * n))
    assert Counter(seen[:n]) == expected and Counter(seen[n:]) == expected
    assert seen[:n] != seen[n:]  # reshuffled each epoch


def test_blend_weights_respected(two_datasets):
    web, code = two_datasets
    web_rows, code_rows = set(oracle_rows(web)), set(oracle_rows(code))
    c = cfg(web, code, weights=[0.7, 0.3], num_workers=0, shuffle_buffer=64)
    got = rows(take(TokenLoader(c, 0, 1, 50), 40))
    n = len(got)
    n_web = sum(r in web_rows for r in got)
    assert n_web + sum(r in code_rows for r in got) == n
    sigma = (0.7 * 0.3 / n) ** 0.5
    assert abs(n_web / n - 0.7) < 4 * sigma, (n_web / n, sigma)
    # the replay used on resume agrees with the draws themselves
    s = BlendSampler([0.7, 0.3], seed=7, slot=3)
    draws = s.draws(0)
    first = [next(draws) for _ in range(10000)]
    assert s.counts_before(9000) == [first[:9000].count(0), first[:9000].count(1)]
    resumed = s.draws(5000)
    assert [next(resumed) for _ in range(100)] == first[5000:5100]


def test_validation_pass(tmp_path):
    from data_helpers import make_docs, tokenized

    d = tokenized(tmp_path, "v", make_docs(200, "v"), val_ratio=0.3, shard_samples=4)
    c = cfg(d, valid_path=str(d))
    expected = oracle_rows(d, "valid")
    one = build_valid_loader(c, 0, 1, 4)
    a = rows(one)
    assert a == rows(one) == rows(build_valid_loader(c, 0, 1, 4))  # same every pass and every run
    assert Counter(a) == Counter(expected)
    c0 = cfg(d, valid_path=str(d), num_workers=0)
    assert rows(build_valid_loader(c0, 0, 1, 4)) == expected  # unshuffled: file order
    both = rows(build_valid_loader(c, 0, 2, 4)) + rows(build_valid_loader(c, 1, 2, 4))
    assert Counter(both) == Counter(expected)


def test_dp_size_change_warns_and_restarts_epoch(two_datasets):
    web, _ = two_datasets
    c = cfg(web, num_workers=1)
    old = TokenLoader(c, 0, 2, 2)
    take(old, 5)
    state = old.state_dict()
    new = TokenLoader(c, 0, 1, 2)
    with pytest.warns(
        UserWarning, match=r"dp_size 2->1.*restarting epoch 0: 20 samples of it are seen a second"
    ):
        new.load_state_dict(state)
    # restarting epoch 0 with the new layout == a fresh run with the new layout
    assert rows(take(new, 4)) == rows(take(TokenLoader(c, 0, 1, 2), 4))
    nxt = TokenLoader(cfg(web, num_workers=1, on_dp_change="next_epoch"), 0, 1, 2)
    with pytest.warns(UserWarning, match="starting epoch 1: .* skipped"):
        nxt.load_state_dict(state)
    assert nxt.state_dict()["base_epochs"] == [1]
    strict = TokenLoader(cfg(web, num_workers=1, on_dp_change="error"), 0, 1, 2)
    with pytest.raises(ValueError, match="dp_size 2->1"):
        strict.load_state_dict(state)


def test_state_mismatch_errors(two_datasets):
    web, code = two_datasets
    state = TokenLoader(cfg(web), 0, 1, 2).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(cfg(web, seed=9), 0, 1, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="datasets"):
        TokenLoader(cfg(web, code), 0, 1, 2).load_state_dict(state)


def test_resume_is_exact_through_webdataset_reader(tmp_path):
    """Shards without an offset index stream through webdataset's tar iterator; resume is exact there too."""
    from data_helpers import make_docs, tokenized

    d = tokenized(tmp_path, "w", make_docs(200, "w"), shard_samples=8)
    man = json.loads((d / "manifest.json").read_text())
    for shard in man["splits"]["train"]["shards"]:
        shard.pop("index")
    (d / "manifest.json").write_text(json.dumps(man))
    c = cfg(d, num_workers=2)
    ref = rows(take(TokenLoader(c, 0, 1, 3), 14))
    for k in (3, 9):
        first = TokenLoader(c, 0, 1, 3)
        take(first, k)
        resumed = TokenLoader(c, 0, 1, 3)
        resumed.load_state_dict(first.state_dict())
        assert rows(take(resumed, 14 - k)) == ref[3 * k :]


def test_every_iter_of_validation_starts_a_fresh_pass(tmp_path):
    from data_helpers import make_docs, tokenized

    d = tokenized(tmp_path, "v", make_docs(100, "v"), val_ratio=0.4, shard_samples=4)
    loader = build_valid_loader(cfg(d, valid_path=str(d)), 0, 1, 2)
    it = iter(loader)
    first = rows([next(it), next(it)])
    full = rows(iter(loader))  # an interrupted pass does not leak into the next one
    assert full[:4] == first and full == rows(loader)
    it = iter(loader)
    head = rows([next(it)])
    assert head + rows(it) == full  # continuing a started iterator does not restart it

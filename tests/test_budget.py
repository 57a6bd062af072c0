"""Budget subsets: bytes within budget, stratified by class, reproducible and nested."""

import json

import numpy as np
import pytest

from conftest import run_job, write_synth
from tokray.storage.budget import Budget, allocate, make_subset
from tokray.storage.dataset import open_dataset


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("src") / "ds")
    write_synth(uri, samples=6000, shard_rows=1000, classes=7)
    return uri


def _sids(uri):
    return np.concatenate([b["sample_id"] for b in open_dataset(uri).iter_batches()])


def _check_stratified(source, uri):
    src_counts = np.bincount(open_dataset(source).labels(), minlength=7)
    sub = open_dataset(uri)
    counts = np.bincount(sub.labels(), minlength=7)
    expected = src_counts * len(sub) / src_counts.sum()
    assert np.all(np.abs(counts - expected) <= 1), (counts, expected)


@pytest.mark.parametrize("spec", ["10%", "37%", "120KB", "0.05MB"])
def test_byte_budgets_fit(source, tmp_path, spec):
    budget = Budget.parse(spec)
    m = make_subset(source, str(tmp_path / "sub"), budget, seed=3)
    limit = m.meta.extra["subset"]["budget_bytes"]
    on_disk = sum(f.stat().st_size for f in (tmp_path / "sub").iterdir())
    assert m.store_bytes == on_disk <= limit
    assert on_disk > 0.9 * limit  # and uses most of it
    _check_stratified(source, str(tmp_path / "sub"))


def test_lmdb_budget_counts_lmdb_pages(source, tmp_path):
    m = make_subset(source, f"lmdb://{tmp_path}/env", Budget.parse("100KB"), seed=0)
    assert (tmp_path / "env" / "data.mdb").stat().st_size <= m.store_bytes <= 100_000
    _check_stratified(source, f"lmdb://{tmp_path}/env")


def test_sample_budget_and_seeds(source, tmp_path):
    a = make_subset(source, str(tmp_path / "a"), Budget.parse("1000samples"), seed=1)
    b = make_subset(source, str(tmp_path / "b"), Budget.parse("1000samples"), seed=1)
    c = make_subset(source, str(tmp_path / "c"), Budget.parse("1000samples"), seed=2)
    small = make_subset(source, str(tmp_path / "s"), Budget.parse("300samples"), seed=1)
    assert a.num_samples == 1000 and small.num_samples == 300
    sa, sb, sc, ss = (_sids(str(tmp_path / x)) for x in "abcs")
    np.testing.assert_array_equal(sa, sb)  # same seed, same subset
    assert not np.array_equal(sa, sc)
    assert set(ss) <= set(sa)  # nested: a smaller budget is inside a larger one
    _check_stratified(source, str(tmp_path / "a"))


def test_allocate_is_within_one():
    sizes = np.array([100, 57, 3, 40])
    for n in range(0, 200):
        counts = allocate(sizes, n)
        assert counts.sum() == n
        assert np.all(np.abs(counts - sizes * n / sizes.sum()) < 1)


def test_subset_cli(source, tmp_path):
    out = run_job("jobs/dataset.py", "subset", source, str(tmp_path / "sub"), "--budget", "25%")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["store_bytes"] <= res["budget_bytes"]
    bad = run_job("jobs/dataset.py", "subset", source, str(tmp_path / "bad"), "--budget", "lots")
    assert bad.returncode == 2 and "budget 'lots'" in bad.stderr and not (tmp_path / "bad").exists()


def test_an_interrupted_subset_resumes_within_its_budget(tmp_path, monkeypatch):
    from tokray.storage import budget as budget_mod
    from tokray.storage.budget import Budget, make_subset
    from tokray.storage.dataset import open_dataset

    src = str(tmp_path / "src")
    write_synth(src, samples=6000, shard_rows=500)
    real = budget_mod._write_selection
    calls = []

    def interrupted(writer, ds, selected, starts):
        if writer.store.uri.path.endswith("sub") and not calls:
            calls.append(1)
            writer.write_table(ds.read_shard(0))  # a shard of other rows lands, then the kill
            raise KeyboardInterrupt
        return real(writer, ds, selected, starts)

    monkeypatch.setattr(budget_mod, "_write_selection", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_subset(src, str(tmp_path / "sub"), Budget.parse("30%"))
    monkeypatch.setattr(budget_mod, "_write_selection", real)
    m = make_subset(src, str(tmp_path / "sub"), Budget.parse("30%"))
    limit = int(open_dataset(src).manifest.store_bytes * 0.30)
    assert m.store_bytes <= limit and open_dataset(tmp_path / "sub").verify() == []

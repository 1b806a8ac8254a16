"""Tests for sparse_engine.app.data: IDX parsing, locating Fashion-MNIST, batching, synthetic tasks.

No test touches the network: every test that could reach the download path replaces
`data._fetch_url` (the single HTTP call) first.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_engine.app import data
from sparse_engine.app.data import DataError

STEMS = data.FASHION_MNIST_FILES


# --------------------------------------------------------------------------------------------------
# helpers


def idx_bytes(arr: np.ndarray, code: int | None = None) -> bytes:
    """Encode `arr` as IDX (written independently of the parser: struct for the header, numpy '>')."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
             np.float32: 0x0D, np.float64: 0x0E}
    if code is None:
        code = codes[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def fake_fashion_dir(d: Path, n_train: int = 50, n_test: int = 20, gz: bool = True, seed: int = 0,
                     labels_train: np.ndarray | None = None) -> Path:
    """A directory of small but well-formed Fashion-MNIST-shaped IDX files."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (labels_train if labels_train is not None
                         else rng.integers(0, 10, n_train, dtype=np.uint8)),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for role, arr in arrays.items():
        name = STEMS[role] + (".gz" if gz else "")
        write(d / name, idx_bytes(arr), gz)
    return d


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No env var, no Debian dir, an empty cache, and a network that fails loudly if touched."""
    monkeypatch.delenv("SPARSE_ENGINE_DATA", raising=False)
    monkeypatch.setenv("SPARSE_ENGINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    calls: list[str] = []

    def offline(url, timeout):
        calls.append(url)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(data, "_fetch_url", offline)
    return calls


# --------------------------------------------------------------------------------------------------
# IDX round trip


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize(
    "shape,dtype",
    [((5, 7, 3), np.uint8), ((13,), np.uint8), ((1,), np.uint8), ((4, 3), np.int16),
     ((2, 3, 2), np.int32), ((6,), np.float32), ((3, 2), np.float64), ((9,), np.int8)],
)
def test_idx_round_trip(tmp_path, gz, shape, dtype):
    rng = np.random.default_rng()
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    else:
        arr = rng.standard_normal(shape).astype(dtype)
    p = write(tmp_path / "x.idx", idx_bytes(arr), gz)
    t = data.read_idx(p)
    assert tuple(t.shape) == shape
    assert t.dtype == torch.from_numpy(arr).dtype
    assert np.array_equal(t.numpy(), arr)


def test_idx_gzip_detected_by_content_not_suffix(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    p = write(tmp_path / "no-suffix", idx_bytes(arr), gz=True)
    q = write(tmp_path / "looks.gz", idx_bytes(arr), gz=False)
    assert np.array_equal(data.read_idx(p).numpy(), arr)
    assert np.array_equal(data.read_idx(q).numpy(), arr)


def test_idx_zero_length_dim(tmp_path):
    arr = np.zeros((0, 28, 28), dtype=np.uint8)
    t = data.read_idx(write(tmp_path / "e.idx", idx_bytes(arr), gz=False))
    assert tuple(t.shape) == (0, 28, 28)


# --------------------------------------------------------------------------------------------------
# IDX corruption: every case names the file


def _good(n=4):
    return idx_bytes(np.arange(n * 6, dtype=np.uint8).reshape(n, 2, 3))


CORRUPT = {
    "bad magic": (b"\x01\x00" + _good()[2:], "magic"),
    "bad magic 2nd byte": (b"\x00\x07" + _good()[2:], "magic"),
    "unknown dtype": (_good()[:2] + b"\x0a" + _good()[3:], "dtype code 0x0a"),
    "too short": (b"\x00\x00", "too short"),
    "empty": (b"", "too short"),
    "zero dims": (b"\x00\x00\x08\x00", "0 dimensions"),
    "truncated header": (_good()[:9], "truncated IDX header"),
    "truncated payload": (_good()[:-5], "truncated IDX payload"),
    "trailing bytes": (_good() + b"\x00\x01", "size mismatch"),
    "dims say more": (struct.pack(">BBBBI", 0, 0, 8, 1, 10) + bytes(9), "truncated"),
}


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_idx_corruption_raises_data_error_naming_file(tmp_path, case, gz):
    payload, what = CORRUPT[case]
    p = write(tmp_path / f"bad-{case.replace(' ', '_')}.idx", payload, gz)
    with pytest.raises(DataError) as ei:
        data.read_idx(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert what in msg
    assert isinstance(ei.value, ValueError)


def test_idx_cut_gzip_stream(tmp_path):
    blob = gzip.compress(_good(200))
    p = tmp_path / "cut.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.gz"):
        data.read_idx(p)


def test_idx_missing_file(tmp_path):
    p = tmp_path / "nope.idx"
    with pytest.raises(DataError, match="nope.idx.*not found"):
        data.read_idx(p)


# --------------------------------------------------------------------------------------------------
# find_fashion_mnist


def test_find_explicit_missing_dir_names_it(isolated, tmp_path):
    d = tmp_path / "typo-dir"
    with pytest.raises(DataError, match="typo-dir"):
        data.find_fashion_mnist(d)
    with pytest.raises(DataError, match="typo-dir"):
        data.load_fashion_mnist(str(d))
    assert isolated == []  # an explicit dir never falls through to a download


def test_find_explicit_incomplete_dir_names_missing_files(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "partial")
    (d / (STEMS["test_labels"] + ".gz")).unlink()
    with pytest.raises(DataError) as ei:
        data.find_fashion_mnist(d)
    assert str(d) in str(ei.value) and STEMS["test_labels"] in str(ei.value)
    assert isolated == []


def test_find_explicit_dir(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "mine", gz=False)
    assert data.find_fashion_mnist(str(d)) == d
    files = data.fashion_mnist_files(d)
    assert files["train_images"].name == STEMS["train_images"]  # raw name accepted


def test_find_precedence(isolated, monkeypatch, tmp_path):
    arg = fake_fashion_dir(tmp_path / "arg")
    env = fake_fashion_dir(tmp_path / "env")
    deb = fake_fashion_dir(tmp_path / "deb")
    cache = fake_fashion_dir(tmp_path / "cache" / "fashion-mnist")
    monkeypatch.setattr(data, "DEBIAN_DIR", deb)
    assert data.find_fashion_mnist() == deb  # Debian before cache
    monkeypatch.setenv("SPARSE_ENGINE_DATA", str(env))
    assert data.find_fashion_mnist() == env  # env before Debian
    assert data.find_fashion_mnist(arg) == arg  # argument before env
    monkeypatch.delenv("SPARSE_ENGINE_DATA")
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "gone")
    assert data.find_fashion_mnist() == cache
    assert isolated == []


def test_find_env_var_bad_dir_names_the_variable(isolated, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_ENGINE_DATA", str(tmp_path / "env-typo"))
    with pytest.raises(DataError, match="SPARSE_ENGINE_DATA.*env-typo"):
        data.find_fashion_mnist()
    assert isolated == []


def test_find_incomplete_debian_dir_is_skipped(isolated, monkeypatch, tmp_path):
    deb = fake_fashion_dir(tmp_path / "deb")
    (deb / (STEMS["train_images"] + ".gz")).unlink()
    monkeypatch.setattr(data, "DEBIAN_DIR", deb)
    cache = fake_fashion_dir(tmp_path / "cache" / "fashion-mnist")
    assert data.find_fashion_mnist() == cache


def test_find_nothing_offline_gives_install_hint(isolated, tmp_path):
    with pytest.raises(DataError) as ei:
        data.find_fashion_mnist()
    msg = str(ei.value)
    assert "Fashion-MNIST not found in" in msg
    assert str(tmp_path / "no-debian") in msg and str(tmp_path / "cache" / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    assert "SPARSE_ENGINE_DATA" in msg
    assert len(isolated) == 1 and isolated[0].startswith("https://")  # tried once, failed fast
    assert not list((tmp_path / "cache" / "fashion-mnist").glob("*"))  # nothing half-written


def test_find_no_download_flag(isolated):
    with pytest.raises(DataError, match="not found"):
        data.find_fashion_mnist(download=False)
    assert isolated == []


def test_download_writes_validated_files_atomically(isolated, monkeypatch, tmp_path):
    src = fake_fashion_dir(tmp_path / "upstream")
    fetched: list[str] = []

    def fake_fetch(url, timeout):
        assert timeout <= 30
        name = url.rsplit("/", 1)[1]
        fetched.append(name)
        return (src / name).read_bytes()

    monkeypatch.setattr(data, "_fetch_url", fake_fetch)
    cache = tmp_path / "cache" / "fashion-mnist"
    assert data.find_fashion_mnist() == cache
    assert sorted(fetched) == sorted(s + ".gz" for s in STEMS.values())
    assert sorted(p.name for p in cache.iterdir()) == sorted(s + ".gz" for s in STEMS.values())
    ds = data.load_fashion_mnist()  # now found in the cache, no second download
    assert len(fetched) == 4 and ds.x_train.shape == (50, 784)


def test_download_garbage_is_not_kept(isolated, monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_fetch_url", lambda url, timeout: b"<html>rate limited</html>")
    with pytest.raises(DataError, match="download.*failed") as ei:
        data.find_fashion_mnist()
    assert "apt-get install dataset-fashion-mnist" in str(ei.value)
    cache = tmp_path / "cache" / "fashion-mnist"
    assert list(cache.iterdir()) == []  # neither the final name nor a temp file


# --------------------------------------------------------------------------------------------------
# load_fashion_mnist on fake files


def test_load_fake_normalisation_and_shapes(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "f", n_train=37, n_test=11)
    ds = data.load_fashion_mnist(d)
    assert ds.x_train.shape == (37, 784) and ds.x_test.shape == (11, 784)
    assert ds.input_shape == (784,)
    assert ds.y_train.dtype == torch.int64 and ds.x_train.dtype == torch.float32
    raw_train = data.read_idx(d / (STEMS["train_images"] + ".gz")).double() / 255
    raw_test = data.read_idx(d / (STEMS["test_images"] + ".gz")).double() / 255
    mean, std = raw_train.mean().item(), raw_train.std(unbiased=False).item()
    assert ds.info["mean"] == pytest.approx(mean, rel=1e-12)
    assert ds.info["std"] == pytest.approx(std, rel=1e-12)
    torch.testing.assert_close(ds.x_train.double(), ((raw_train - mean) / std).reshape(37, 784),
                               rtol=1e-5, atol=1e-5)
    # test data uses the *train* statistics
    torch.testing.assert_close(ds.x_test.double(), ((raw_test - mean) / std).reshape(11, 784),
                               rtol=1e-5, atol=1e-5)
    img = data.load_fashion_mnist(d, flatten=False, dtype=torch.float64)
    assert img.x_train.shape == (37, 1, 28, 28) and img.input_shape == (1, 28, 28)
    assert img.x_train.dtype == torch.float64
    assert torch.equal(img.y_test, ds.y_test)


def test_load_labels_out_of_range(isolated, tmp_path):
    labels = np.zeros(50, dtype=np.uint8)
    labels[7] = 10
    d = fake_fashion_dir(tmp_path / "f", labels_train=labels)
    with pytest.raises(DataError, match=rf"{STEMS['train_labels']}.*0\.\.9.*0\.\.10"):
        data.load_fashion_mnist(d)


def test_load_count_mismatch(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "f", labels_train=np.ones(49, dtype=np.uint8))
    with pytest.raises(DataError) as ei:
        data.load_fashion_mnist(d)
    msg = str(ei.value)
    assert STEMS["train_images"] in msg and STEMS["train_labels"] in msg and "50" in msg and "49" in msg


def test_load_wrong_image_shape(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "f")
    p = d / (STEMS["test_images"] + ".gz")
    write(p, idx_bytes(np.zeros((20, 28, 27), dtype=np.uint8)), gz=True)
    with pytest.raises(DataError, match=rf"{STEMS['test_images']}.*28, 28"):
        data.load_fashion_mnist(d)


def test_load_corrupt_file_names_it(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "f")
    p = d / (STEMS["test_labels"] + ".gz")
    write(p, b"\x00\x00\x08\x01" + struct.pack(">I", 20) + bytes(5), gz=True)
    with pytest.raises(DataError, match=STEMS["test_labels"]):
        data.load_fashion_mnist(d)


def test_load_bad_dtype(isolated, tmp_path):
    d = fake_fashion_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="dtype"):
        data.load_fashion_mnist(d, dtype=torch.int32)


# --------------------------------------------------------------------------------------------------
# the real Fashion-MNIST (Debian package)


@pytest.fixture(scope="module")
def real_fashion():
    deb = data.DEBIAN_DIR
    if not deb.is_dir() or data._missing_in(deb):
        pytest.skip(
            f"real Fashion-MNIST not installed in {deb}: run `apt-get update && apt-get install -y "
            "dataset-fashion-mnist` (CI installs it)"
        )
    return data.load_fashion_mnist(deb)


def test_real_fashion_mnist(real_fashion):
    ds = real_fashion
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert ds.y_train.shape == (60000,) and ds.y_test.shape == (10000,)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.n_classes == 10 and ds.input_shape == (784,)
    # Fashion-MNIST is exactly balanced: 6000 / 1000 per class.
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    # standardised with its own statistics
    assert abs(ds.x_train.double().mean().item()) < 1e-4
    assert abs(ds.x_train.double().std().item() - 1) < 1e-4
    # the affine map is invertible back to the 256 grey levels
    pixels = (ds.x_test[:500].double() * ds.info["std"] + ds.info["mean"]) * 255
    assert (pixels - pixels.round()).abs().max().item() < 1e-3
    assert pixels.min().item() > -0.5 and pixels.max().item() < 255.5
    # not all-equal images: sample standard deviations vary
    assert ds.x_train[:100].std(1).min().item() > 0


# --------------------------------------------------------------------------------------------------
# batches


def _xy(n, feat=3):
    x = torch.arange(n * feat, dtype=torch.float32).reshape(n, feat)
    return x, torch.arange(n)


@pytest.mark.parametrize("n,bs", [(1, 1), (7, 3), (129, 16), (10, 10), (10, 64)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_each_sample_once(n, bs, shuffle):
    x, y = _xy(n)
    seen = []
    for xb, yb in data.batches(x, y, bs, shuffle=shuffle, seed=3, epoch=1):
        assert xb.shape[0] == yb.shape[0] <= bs
        assert torch.equal(xb[:, 0], yb * 3.0)  # x and y stay paired
        seen.append(yb)
    allseen = torch.cat(seen)
    assert sorted(allseen.tolist()) == list(range(n))
    assert len(seen) == -(-n // bs)
    if not shuffle:
        assert allseen.tolist() == list(range(n))


def test_batches_drop_last():
    x, y = _xy(10)
    sizes = [yb.numel() for _, yb in data.batches(x, y, 3, shuffle=True, seed=0, epoch=0, drop_last=True)]
    assert sizes == [3, 3, 3]
    sizes = [yb.numel() for _, yb in data.batches(x, y, 3, shuffle=False, drop_last=False)]
    assert sizes == [3, 3, 3, 1]
    assert list(data.batches(x, y, 11, drop_last=True)) == []


def test_batches_deterministic_per_seed_epoch():
    x, y = _xy(500)

    def order(seed, epoch):
        return torch.cat([yb for _, yb in data.batches(x, y, 64, shuffle=True, seed=seed, epoch=epoch)])

    assert torch.equal(order(0, 0), order(0, 0))
    assert torch.equal(order(5, 3), order(5, 3))
    epochs = [order(0, e) for e in range(5)]
    for i in range(5):
        assert not torch.equal(epochs[i], torch.arange(500))
        for j in range(i + 1, 5):
            assert not torch.equal(epochs[i], epochs[j])
    assert not torch.equal(order(0, 1), order(1, 0))
    assert not torch.equal(order(1, 0), order(2, 0))


@pytest.mark.parametrize("bad", [0, -1, 2.5, None, True])
def test_batches_bad_batch_size(bad):
    x, y = _xy(4)
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(x, y, bad)  # raises at the call, not at the first next()


def test_batches_mismatch_and_empty():
    x, y = _xy(4)
    with pytest.raises(ValueError, match="same number of samples"):
        data.batches(x, y[:3], 2)
    with pytest.raises(ValueError, match="empty"):
        data.batches(x[:0], y[:0], 2)


def test_batches_sizes_full_epoch():
    # Speed is a benchmark's business, not a unit test's: here only the batch structure of a full epoch.
    x = torch.randn(60000, 784)
    y = torch.randint(0, 10, (60000,))
    sizes = [yb.numel() for _, yb in data.batches(x, y, 128, shuffle=True, seed=0, epoch=0)]
    assert len(sizes) == -(-60000 // 128) and sum(sizes) == 60000
    assert set(sizes[:-1]) == {128} and sizes[-1] == 60000 - 128 * (len(sizes) - 1)


# --------------------------------------------------------------------------------------------------
# synthetic tasks


def test_teacher_deterministic_and_shapes():
    a = data.synthetic_teacher(300, 100, in_features=50, n_classes=5, seed=7)
    b = data.synthetic_teacher(300, 100, in_features=50, n_classes=5, seed=7)
    c = data.synthetic_teacher(300, 100, in_features=50, n_classes=5, seed=8)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.x_train, c.x_train) and not torch.equal(a.y_train, c.y_train)
    assert a.x_train.shape == (300, 50) and a.x_test.shape == (100, 50) and a.input_shape == (50,)
    assert a.y_train.dtype == torch.int64 and a.x_train.dtype == torch.float32
    assert a.n_classes == 5
    assert int(a.y_train.min()) >= 0 and int(a.y_train.max()) < 5
    d = data.synthetic_teacher(64, 8)
    assert d.x_train.shape == (64, 784) and d.n_classes == 10


def test_teacher_classes_roughly_balanced():
    ds = data.synthetic_teacher(5000, 10, in_features=100, n_classes=10, seed=0)
    counts = torch.bincount(ds.y_train, minlength=10)
    assert counts.min().item() > 0.3 * 500, counts.tolist()


def test_teacher_is_learnable():
    # A small student must do far better than chance (10 %): the labels are a function of x, not noise.
    torch.manual_seed(0)
    ds = data.synthetic_teacher(4000, 1000, in_features=64, n_classes=10, seed=1)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(m.parameters(), 2e-3)
    for ep in range(8):
        for xb, yb in data.batches(ds.x_train, ds.y_train, 128, shuffle=True, seed=0, epoch=ep):
            loss = torch.nn.functional.cross_entropy(m(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (m(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
    assert acc > 0.35, acc


def test_sequences_deterministic_shapes_and_labels():
    a = data.synthetic_sequences(400, 100, seq_len=20, vocab=12, seed=3)
    b = data.synthetic_sequences(400, 100, seq_len=20, vocab=12, seed=3)
    c = data.synthetic_sequences(400, 100, seq_len=20, vocab=12, seed=4)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.x_train, c.x_train)
    assert a.x_train.shape == (400, 20) and a.x_test.shape == (100, 20) and a.input_shape == (20,)
    assert a.x_train.dtype == torch.int64 and a.y_train.dtype == torch.int64
    assert a.vocab_size == 12 and a.n_classes == 12
    for x, y in ((a.x_train, a.y_train), (a.x_test, a.y_test)):
        assert int(x.min()) >= 0 and int(x.max()) < 12
        counts = torch.nn.functional.one_hot(x, 12).sum(1)
        top2 = counts.topk(2, dim=1).values
        assert (top2[:, 0] > top2[:, 1]).all()  # a strict majority token: unambiguous labels
        assert torch.equal(counts.argmax(1), y)
    assert len(torch.unique(a.y_train)) == 12


def test_sequences_fewer_classes_and_errors():
    ds = data.synthetic_sequences(200, 50, seq_len=16, vocab=8, n_classes=3, seed=0)
    assert ds.n_classes == 3 and set(ds.y_train.tolist()) == {0, 1, 2}
    assert int(ds.x_train.max()) < 8
    with pytest.raises(ValueError, match="n_classes"):
        data.synthetic_sequences(10, 10, vocab=4, n_classes=5)
    with pytest.raises(ValueError, match="seq_len"):
        data.synthetic_sequences(10, 10, seq_len=0)
    with pytest.raises(ValueError, match="n_train"):
        data.synthetic_sequences(0, 10)
    with pytest.raises(ValueError, match="n_test"):
        data.synthetic_teacher(10, -1)


def test_sequences_not_solved_by_position():
    # The label must depend on the whole sequence: no single position predicts it well.
    ds = data.synthetic_sequences(4000, 10, seed=0)
    per_pos = (ds.x_train == ds.y_train[:, None]).float().mean(0)
    assert per_pos.max().item() < 0.5, per_pos.max().item()


def test_dataset_checks_counts():
    with pytest.raises(DataError, match="x_train has 3 samples, y_train has 2"):
        data.Dataset(torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1), 2, "t")

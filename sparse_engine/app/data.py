"""Datasets for sparse_engine: the Fashion-MNIST IDX loader and small synthetic tasks.

Everything is held as plain in-memory tensors: the datasets are small (Fashion-MNIST is 188 MB as
float32), so a per-sample Dataset/DataLoader would only add Python overhead to every step. `batches`
slices them with one random permutation per epoch.

Where Fashion-MNIST comes from (first hit wins, see `find_fashion_mnist`):
  1. the `data_dir` argument (e.g. the CLI's --data-dir),
  2. $SPARSE_ENGINE_DATA,
  3. the Debian package location /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`),
  4. the cache, $SPARSE_ENGINE_CACHE/fashion-mnist (default ~/.cache/sparse_engine/fashion-mnist),
  5. a download into that cache (short timeout: the usual machine is offline).
"""
from __future__ import annotations

import gzip
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = [
    "DataError",
    "Dataset",
    "read_idx",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "synthetic_teacher",
    "synthetic_sequences",
    "batches",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_CLASSES",
]


class DataError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file."""


# IDX type code -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"

#: role -> standard file name (without .gz; either form is accepted).
FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# Module attributes (not constants baked into functions) so tests can point them elsewhere.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# The upstream repository serves the original .gz files over https (its S3 mirror is http only).
DOWNLOAD_URL = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
DOWNLOAD_TIMEOUT_S = 5.0

_INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR / set SPARSE_ENGINE_DATA"
)


# --------------------------------------------------------------------------------------------------
# IDX parsing


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == _GZIP_MAGIC:
                # Detect gzip by content, not by suffix: files get renamed and decompressed in place.
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read()
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Parse an IDX file (gzipped or raw) into a CPU tensor of its native dtype and shape.

    Header: two zero bytes, one type code byte, one ndim byte, then ndim big-endian uint32 sizes;
    the payload is prod(sizes) big-endian items, nothing more, nothing less.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic: first two bytes must be 0x00 0x00, got 0x{raw[0]:02x} 0x{raw[1]:02x}"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: IDX header says 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, file has {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got < expected:
        raise DataError(
            f"{path}: truncated IDX payload: shape {dims} of {dtype.name} needs {expected} bytes, "
            f"file has {got}"
        )
    if got > expected:
        raise DataError(
            f"{path}: IDX size mismatch: shape {dims} of {dtype.name} needs {expected} bytes, "
            f"file has {got} ({got - expected} trailing)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # To native byte order (a copy, which also makes the array writable for torch).
    arr = arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)
    return torch.from_numpy(arr)


# --------------------------------------------------------------------------------------------------
# Locating / downloading Fashion-MNIST


def _cache_dir() -> Path:
    base = os.environ.get("SPARSE_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                  "sparse_engine")
    return Path(base) / "fashion-mnist"


def _file_in(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def _missing_in(directory: Path) -> list[str]:
    return [stem for stem in FASHION_MNIST_FILES.values() if _file_in(directory, stem) is None]


def fashion_mnist_files(directory: str | os.PathLike) -> dict[str, Path]:
    """role -> path of each of the four files in `directory` (.gz preferred); DataError if any is missing."""
    directory = Path(directory)
    missing = _missing_in(directory)
    if missing:
        raise DataError(f"{directory}: missing Fashion-MNIST files {missing} (.gz or raw)")
    out: dict[str, Path] = {}
    for role, stem in FASHION_MNIST_FILES.items():
        found = _file_in(directory, stem)
        assert found is not None  # checked by _missing_in above
        out[role] = found
    return out


def _fetch_url(url: str, timeout: float) -> bytes:
    """One HTTP GET; split out so tests can replace it and never touch the network."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _download_fashion_mnist(dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch the missing files into `dest`. Each file is validated as IDX, then renamed into place, so a
    killed or failed download never leaves a half-written file under the real name."""
    dest.mkdir(parents=True, exist_ok=True)
    for stem in _missing_in(dest):
        url = DOWNLOAD_URL + stem + ".gz"
        data = _fetch_url(url, timeout)
        final = dest / (stem + ".gz")
        tmp = dest / f".{stem}.gz.{os.getpid()}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            read_idx(tmp)  # raises DataError on an HTML error page or a cut transfer
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()


def find_fashion_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Return the directory holding the four Fashion-MNIST IDX files.

    An explicit `data_dir` or $SPARSE_ENGINE_DATA must exist and hold the files (DataError naming it
    otherwise: a typo must not silently fall through to some other copy). The Debian location and the
    cache are used when complete; failing all, the files are downloaded into the cache when `download`.
    """
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise DataError(f"data_dir {str(d)!r} does not exist or is not a directory")
        fashion_mnist_files(d)
        return d
    env = os.environ.get("SPARSE_ENGINE_DATA")
    if env:
        d = Path(env).expanduser()
        if not d.is_dir():
            raise DataError(f"SPARSE_ENGINE_DATA={env!r} does not exist or is not a directory")
        try:
            fashion_mnist_files(d)
        except DataError as e:
            raise DataError(f"SPARSE_ENGINE_DATA: {e}") from None
        return d
    cache = _cache_dir()
    searched = [DEBIAN_DIR, cache]
    for d in searched:
        if d.is_dir() and not _missing_in(d):
            return d
    where = ", ".join(str(d) for d in searched)
    if not download:
        raise DataError(f"Fashion-MNIST not found in {where}; {_INSTALL_HINT}")
    try:
        _download_fashion_mnist(cache)
    except (OSError, urllib.error.URLError, DataError, ValueError) as e:
        raise DataError(
            f"Fashion-MNIST not found in {where} and the download from {DOWNLOAD_URL} failed "
            f"({type(e).__name__}: {e}); {_INSTALL_HINT}"
        ) from e
    return cache


# --------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class Dataset:
    """Train/test tensors of one task. x_*: float features (or int64 token ids), y_*: int64 labels.

    input_shape is the shape of one sample (x_train.shape[1:]); vocab_size is set for token tasks;
    info holds task facts (normalisation mean/std, teacher sizes, ...).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    name: str
    vocab_size: int | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name}: x_{split} has {x.shape[0]} samples, y_{split} has {y.shape[0]}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: sample shapes differ: train {tuple(self.x_train.shape[1:])}, "
                f"test {tuple(self.x_test.shape[1:])}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.x_test.shape[0]


def _check_labels(y: torch.Tensor, n_classes: int, path: Path) -> None:
    if y.dim() != 1:
        raise DataError(f"{path}: labels must be 1-D, got shape {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise DataError(
            f"{path}: labels must be in 0..{n_classes - 1}, got range {int(y.min())}..{int(y.max())}"
        )


def _check_images(x: torch.Tensor, path: Path) -> None:
    if x.dtype != torch.uint8 or x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
        raise DataError(f"{path}: expected uint8 images of shape (N, 28, 28), got {x.dtype} {tuple(x.shape)}")


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    flatten: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Fashion-MNIST as in-memory tensors.

    x: pixels / 255, then standardised with the train set's own mean and std (one scalar each, stored
    in `info`); shape (N, 784) when flatten else (N, 1, 28, 28); `dtype` on `device`.
    y: int64 in 0..9. N = 60000 train, 10000 test for the real files.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    files = fashion_mnist_files(find_fashion_mnist(data_dir))
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        xp, yp = files[f"{split}_images"], files[f"{split}_labels"]
        x, y = read_idx(xp), read_idx(yp)
        _check_images(x, xp)
        _check_labels(y, 10, yp)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{xp}: {x.shape[0]} images but {yp} has {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{xp}: holds no images")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.to(torch.int64)

    # Exact mean/std of the train pixels from a 256-bin histogram: no float64 copy of 47M pixels.
    counts = np.bincount(out["x_train"].numpy().reshape(-1), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float((counts * levels).sum() / total)
    std = float(np.sqrt((counts * (levels - mean) ** 2).sum() / total))
    if std == 0.0:
        raise DataError(f"{files['train_images']}: every train pixel is the same value; cannot standardise")
    # (p/255 - mean)/std as one affine map, in float32 (then cast) so half dtypes do not lose the offset.
    scale, shift = 1.0 / (255.0 * std), -mean / std
    shape = (-1, 784) if flatten else (-1, 1, 28, 28)
    for split in ("train", "test"):
        x = out[f"x_{split}"].to(torch.float32).mul_(scale).add_(shift).reshape(shape)
        out[f"x_{split}"] = x.to(device=device, dtype=dtype)
        out[f"y_{split}"] = out[f"y_{split}"].to(device)
    return Dataset(
        **out, n_classes=10, name="fashion-mnist",
        info={"mean": mean, "std": std, "classes": FASHION_MNIST_CLASSES,
              "source": str(files["train_images"].parent)},
    )


def _check_positive(**kwargs: int) -> None:
    for name, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def synthetic_teacher(
    n_train: int,
    n_test: int,
    in_features: int = 784,
    n_classes: int = 10,
    seed: int = 0,
    hidden: int = 64,
    teacher_density: float = 0.1,
) -> Dataset:
    """Teacher-student classification: x ~ N(0, I) of shape (N, in_features); labels are the argmax of
    a random 2-layer ReLU teacher whose first layer keeps `teacher_density` of its weights.

    The teacher's logits are centred by their per-class train mean so the classes come out roughly
    balanced (a raw random teacher favours a few classes). Deterministic per seed.
    """
    _check_positive(n_train=n_train, n_test=n_test, in_features=in_features, hidden=hidden)
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    if not 0.0 < teacher_density <= 1.0:
        raise ValueError(f"teacher_density must be in (0, 1], got {teacher_density}")
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(hidden, in_features, generator=g) < teacher_density
    fan_in = max(1.0, teacher_density * in_features)
    w1 = torch.randn(hidden, in_features, generator=g) * mask / fan_in**0.5
    b1 = torch.randn(hidden, generator=g) * 0.1
    w2 = torch.randn(n_classes, hidden, generator=g) / hidden**0.5
    x = torch.randn(n_train + n_test, in_features, generator=g)
    logits = torch.relu(x @ w1.T + b1) @ w2.T
    logits -= logits[:n_train].mean(0)
    y = logits.argmax(1)
    return Dataset(
        x_train=x[:n_train].contiguous(), y_train=y[:n_train].contiguous(),
        x_test=x[n_train:].contiguous(), y_test=y[n_train:].contiguous(),
        n_classes=n_classes, name=f"teacher-{in_features}-{hidden}-{n_classes}",
        info={"hidden": hidden, "teacher_density": teacher_density, "seed": seed},
    )


def synthetic_sequences(
    n_train: int,
    n_test: int,
    seq_len: int = 32,
    vocab: int = 16,
    n_classes: int | None = None,
    seed: int = 0,
    bias: float = 0.1,
) -> Dataset:
    """Majority-token classification for a tiny transformer: x is (N, seq_len) int64 token ids in
    0..vocab-1, y is the token that occurs strictly most often (labels 0..n_classes-1, n_classes <= vocab,
    default vocab).

    Each sequence draws a target class c uniformly; every position is c with probability `bias`, else
    uniform over the vocabulary; rows where c is not the strict mode are redrawn, so every label is
    unambiguous. Solving it needs counting across the whole sequence (attention pooling), which a
    2-layer transformer learns in well under a minute on CPU. Deterministic per seed.
    """
    _check_positive(n_train=n_train, n_test=n_test, seq_len=seq_len, vocab=vocab)
    n_classes = vocab if n_classes is None else n_classes
    if not isinstance(n_classes, int) or not 2 <= n_classes <= vocab:
        raise ValueError(f"n_classes must be an int in 2..vocab={vocab}, got {n_classes!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for a strict majority over several tokens, got {seq_len}")
    if not 0.0 <= bias < 1.0:
        raise ValueError(f"bias must be in [0, 1), got {bias}")
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = torch.empty(n, seq_len, dtype=torch.int64)
    todo = torch.arange(n)
    rounds = 0
    while todo.numel():  # each round redraws only the rejected rows
        rounds += 1
        if rounds > 1000:
            raise ValueError(
                f"could not draw sequences with a strict majority token (seq_len={seq_len}, vocab={vocab}, "
                f"bias={bias}); raise bias or seq_len"
            )
        k = todo.numel()
        pick = torch.rand(k, seq_len, generator=g) < bias
        rand_tok = torch.randint(0, vocab, (k, seq_len), generator=g)
        xs = torch.where(pick, y[todo, None], rand_tok)
        counts = torch.zeros(k, vocab, dtype=torch.int64).scatter_add_(1, xs, torch.ones_like(xs))
        c_count = counts.gather(1, y[todo, None]).squeeze(1)
        counts.scatter_(1, y[todo, None], -1)
        ok = c_count > counts.max(1).values
        x[todo[ok]] = xs[ok]
        todo = todo[~ok]
    return Dataset(
        x_train=x[:n_train].contiguous(), y_train=y[:n_train].contiguous(),
        x_test=x[n_train:].contiguous(), y_test=y[n_train:].contiguous(),
        n_classes=n_classes, name=f"majority-{seq_len}x{vocab}", vocab_size=vocab,
        info={"task": "majority token", "bias": bias, "seed": seed},
    )


# --------------------------------------------------------------------------------------------------
# Batching


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Mix (seed, epoch) into one 63-bit seed; a multiplier far from small ints keeps (s, e) and (s+1, e-k)
    # from colliding for any realistic seed/epoch.
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (xb, yb) mini-batches over dim 0 of x and y.

    shuffle: one torch.randperm per epoch from a generator seeded by (seed, epoch), so a run is
    reproducible and resumable at any epoch; each batch is one gather. Without shuffle the batches are
    views in order. drop_last drops a final short batch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x is empty: no samples to batch")
    stop = n - n % batch_size if drop_last else n
    return _batch_iter(x, y, batch_size, shuffle, seed, epoch, stop)


def _batch_iter(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int, epoch: int, stop: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # Split from `batches` so argument errors raise at the call, not at the first next().
    n = x.shape[0]
    if shuffle:
        perm = torch.randperm(n, generator=_epoch_generator(seed, epoch))
        px, py = perm.to(x.device), perm.to(y.device)
        for i in range(0, stop, batch_size):
            yield x[px[i:i + batch_size]], y[py[i:i + batch_size]]
    else:
        for i in range(0, stop, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]

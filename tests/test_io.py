"""save / load: exact round trips, compact size, refusal of corrupt, truncated, foreign and non-sparse_engine
inputs, atomic writes, no code execution, loading into a given architecture.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_engine.export import io
from sparse_engine.export.extract import extract
from sparse_engine.export.infer import InferConv2d, InferLinear, InferModule
from sparse_engine.app.models import MLP, build_model
from sparse_engine.nn import SparseLinear, sparsify


def _sparse_mlp(density=0.1, method="signin", train_steps=3):
    """A trained sparse LeNet-300-100, its input and the dense original's torch.save size."""
    model = build_model("mlp", (784,), 10)
    x = torch.randn(8, 784)
    sparsify(model, method, density)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for _ in range(train_steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model.eval(), x


def _rewrite(path, mutate_header=None, mutate_bytes=None, fix_checksum=True):
    """Re-write a file with its header or bytes changed, the checksum recomputed (a crafted file)."""
    buf = bytearray(Path(path).read_bytes())
    n = int.from_bytes(buf[8:16], "little")
    header = json.loads(buf[16:16 + n])
    body = buf[16 + n:-32]
    if mutate_header:
        mutate_header(header)
        hb = json.dumps(header).encode()
        pad = b"\0" * (-(16 + len(hb)) % 64)
        old_pad = -(16 + n) % 64
        body = pad + body[old_pad:]
        buf = bytearray(io.MAGIC + len(hb).to_bytes(8, "little") + hb) + body
    else:
        buf = buf[:-32]
    if mutate_bytes:
        mutate_bytes(buf)
    if fix_checksum:
        buf += hashlib.sha256(buf).digest()
    else:
        buf += Path(path).read_bytes()[-32:]
    out = str(path) + ".crafted"
    Path(out).write_bytes(bytes(buf))
    return out


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("fmt", ["auto", "csr", "dense", "bsr"])
def test_train_extract_save_load_identical(fmt, tmp_path):
    model, x = _sparse_mlp()
    out = extract(model, fmt)
    path = tmp_path / "mlp.sparse"
    size = io.save(out, path)
    assert size == os.path.getsize(path)
    loaded = io.load(path)
    assert type(loaded) is MLP and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))
    for (na, a), (nb, b) in zip(out.named_modules(), loaded.named_modules()):
        assert na == nb and type(a) is type(b)
        if isinstance(a, InferModule):
            assert a.format == b.format and torch.equal(a.dense_weight(), b.dense_weight())
    # into a freshly built dense model of the same architecture
    skeleton = MLP(784, (300, 100), 10)
    same = io.load(path, model=skeleton)
    assert same is skeleton
    with torch.no_grad():
        assert torch.equal(same(x), out(x))


@pytest.mark.parametrize("name,shape,make_x", [
    ("cnn", (1, 28, 28), lambda: torch.randn(3, 1, 28, 28)),
    ("transformer", (16,), lambda: torch.randint(0, 50, (3, 16))),
])
def test_cnn_and_transformer_round_trip(name, shape, make_x, tmp_path):
    model = build_model(name, shape, 10, vocab_size=50)
    sparsify(model, "static", 0.1)
    x = make_x()
    out = extract(model.eval(), "csr")
    io.save(out, tmp_path / "m.sparse")
    loaded = io.load(tmp_path / "m.sparse")
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))
        # BatchNorm running statistics travel too
        assert torch.equal(io.load(tmp_path / "m.sparse", model=build_model(name, shape, 10, vocab_size=50))(x),
                           out(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_round_trip_exactly(dtype, tmp_path):
    model = nn.Sequential(SparseLinear(40, 30, density=0.2, dtype=dtype), nn.GELU(),
                          SparseLinear(30, 5, density=0.5, dtype=dtype), nn.LayerNorm(5, dtype=dtype))
    out = extract(model, {"0": "csr", "2": "dense"})
    io.save(out, tmp_path / "m.sparse")
    loaded = io.load(tmp_path / "m.sparse")
    assert loaded[0].values.dtype == dtype and loaded[3].weight.dtype == dtype
    for (ka, a), (kb, b) in zip(out.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and a.dtype == b.dtype and torch.equal(a, b)


def test_nm_bsr_conv_and_wide_layers(tmp_path):
    nm = torch.zeros(16, 32, dtype=torch.bool)
    nm[:, 0::4] = nm[:, 3::4] = True
    model = nn.Sequential(
        InferConv2d(torch.randn(8, 3, 3, 3), torch.randn(8), "csr", torch.rand(8, 3, 3, 3) < 0.3, padding=1),
        nn.Flatten(),
        InferLinear(torch.randn(16, 8 * 36), None, "bsr", torch.rand(16, 8 * 36) < 0.2, block_shape=(4, 8)),
        nn.ReLU(),
        InferLinear(torch.randn(32, 16), torch.randn(32), "dense", torch.rand(32, 16) < 0.5),
        nn.Unflatten(1, (1, 32)),
        nn.Flatten(),
        InferLinear(torch.randn(16, 32), None, "nm", nm),
        # K > 65536: column indices need 32 bits
        InferLinear(torch.randn(1, 70_000), None, "csr", torch.rand(1, 70_000) < 0.01),
    )
    x = torch.randn(2, 3, 6, 6)
    path = tmp_path / "mix.sparse"
    io.save(model[:8], path)
    header = io.read_header(path)
    assert header["layers"]["7"]["storage"] == "nm"
    assert header["layers"]["0"]["tensors"]["col"]["encoding"] == "uint16"
    loaded = io.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model[:8](x))
    wide = nn.Sequential(model[8])
    io.save(wide, tmp_path / "wide.sparse")
    assert "encoding" not in io.read_header(tmp_path / "wide.sparse")["layers"]["0"]["tensors"]["col"]
    z = torch.randn(3, 70_000)
    assert torch.equal(io.load(tmp_path / "wide.sparse")(z), wide(z))


def test_file_size_at_90_percent_is_under_a_quarter_of_dense(tmp_path):
    dense = build_model("mlp", (784,), 10)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    dense_size = os.path.getsize(tmp_path / "dense.pt")
    sparsify(dense, "signin", 0.1)
    for fmt in ("csr", "dense", "auto"):
        size = io.save(extract(dense, fmt), tmp_path / f"{fmt}.sparse")
        assert size <= 0.25 * dense_size, (fmt, size, dense_size)
    # and it scales with nnz: half the nonzeros, about half the bytes
    half = build_model("mlp", (784,), 10)
    sparsify(half, "signin", 0.05)
    size_half = io.save(extract(half, "csr"), tmp_path / "half.sparse")
    assert size_half < 0.6 * os.path.getsize(tmp_path / "csr.sparse")


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = SparseLinear(8, 8, density=0.5)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    out = extract(Tied(), "csr")
    io.save(out, tmp_path / "t.sparse")
    header = io.read_header(tmp_path / "t.sparse")
    assert header["aliases"] == {"head.weight": "emb.weight"}
    assert header["architecture"] is None and "Tied" in header["architecture_note"]
    with pytest.raises(io.SparseFileError, match="model="):
        io.load(tmp_path / "t.sparse")
    loaded = io.load(tmp_path / "t.sparse", model=Tied())
    ids = torch.randint(0, 20, (2, 5))
    assert torch.equal(loaded(ids), out(ids))
    assert loaded.head.weight is loaded.emb.weight


# ------------------------------------------------------------------------------------------- refusals


def test_refuses_models_that_are_not_extracted_sparse_engine_models(tmp_path):
    with pytest.raises(ValueError, match="not a sparse_engine model"):
        io.save(nn.Sequential(nn.Linear(3, 4)), tmp_path / "x.sparse")
    with pytest.raises(ValueError, match="extract"):
        io.save(nn.Sequential(SparseLinear(3, 4, density=0.5)), tmp_path / "x.sparse")
    with pytest.raises(TypeError, match="nn.Module"):
        io.save({"w": torch.zeros(3)}, tmp_path / "x.sparse")
    assert not os.listdir(tmp_path)


@pytest.fixture
def saved(tmp_path):
    model, x = _sparse_mlp()
    out = extract(model, "csr")
    path = tmp_path / "m.sparse"
    io.save(out, path)
    return path, out, x


def test_truncated_files_are_refused(saved):
    path, _, _ = saved
    data = Path(path).read_bytes()
    for cut in (0, 4, 12, 40, len(data) // 2, len(data) - 33, len(data) - 1):
        bad = str(path) + f".cut{cut}"
        Path(bad).write_bytes(data[:cut])
        with pytest.raises(io.SparseFileError, match="truncated|not a sparse_engine file|corrupt"):
            io.load(bad)
    Path(str(path) + ".long").write_bytes(data + b"\0")
    with pytest.raises(io.SparseFileError, match="unexpected bytes|checksum"):
        io.load(str(path) + ".long")


def test_any_flipped_byte_is_refused(saved):
    path, _, _ = saved
    data = bytearray(Path(path).read_bytes())
    n = int.from_bytes(data[8:16], "little")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    positions = {3, 9, 16 + n // 2, len(data) - 1, len(data) - 40}
    positions |= {int(p) for p in torch.randint(16 + n, len(data) - 32, (5,), generator=g)}
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        p = str(path) + f".flip{pos}"
        Path(p).write_bytes(bytes(bad))
        with pytest.raises(io.SparseFileError):
            io.load(p)


def test_foreign_files_are_refused(saved, tmp_path):
    _, out, _ = saved
    torch.save(out.state_dict(), tmp_path / "ts.pt")
    with pytest.raises(io.SparseFileError, match="torch.save"):
        io.load(tmp_path / "ts.pt")
    (tmp_path / "p.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(io.SparseFileError, match="pickle"):
        io.load(tmp_path / "p.pkl")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "rand").write_bytes(os.urandom(4096))
    (tmp_path / "json").write_text(json.dumps({"format": "sparse_engine"}))
    for name in ("empty", "rand", "json"):
        with pytest.raises(io.SparseFileError, match="not a sparse_engine file"):
            io.load(tmp_path / name)


def test_crafted_files_with_valid_checksum_are_validated(saved):
    """A file with a correct checksum but a lying header still never builds a bad model."""
    path, _, _ = saved

    def set_layer(key, value):
        return lambda h: h["layers"]["hidden.0"]["spec"].__setitem__(key, value)

    crafted = [
        (lambda h: h.__setitem__("format_version", 99), "format version"),
        (set_layer("type", "os.system"), "unknown type"),
        (lambda h: h["layers"]["hidden.0"]["tensors"]["values"].__setitem__("dtype", "complex128"), "dtype"),
        (lambda h: h["layers"]["hidden.0"]["tensors"]["values"].__setitem__("offset", 10**12), "outside"),
        (lambda h: h["layers"]["hidden.0"]["tensors"]["col"].__setitem__("shape", [3]), "nbytes"),
        (set_layer("weight_shape", [301, 784]), "invalid"),
        (lambda h: h.__setitem__("architecture", {"registered": "os.system"}), "not registered"),
        (lambda h: h.__setitem__("architecture", {"module": "Popen", "args": {}}), "unknown module type"),
        (lambda h: h.__setitem__("architecture", {"container": "builtins.eval", "children": {}}), "bad container"),
        (lambda h: h.__setitem__("architecture", {"module": "Linear", "args": {"device": "cuda"}}), "bad arguments"),
    ]
    for mutate, match in crafted:
        with pytest.raises(io.SparseFileError, match=match):
            io.load(_rewrite(path, mutate_header=mutate))

    # an index out of range inside the data: caught by the index validation, not by the checksum
    header = io.read_header(path)
    entry = header["layers"]["hidden.0"]["tensors"]["col"]
    n = int.from_bytes(Path(path).read_bytes()[8:16], "little")
    start = 16 + n + (-(16 + n) % 64) + entry["offset"]

    def poke(buf):
        buf[start:start + 2] = (65535).to_bytes(2, "little")

    with pytest.raises(io.SparseFileError, match="col"):
        io.load(_rewrite(path, mutate_bytes=poke))
    # the same change without recomputing the checksum is caught by the checksum
    with pytest.raises(io.SparseFileError, match="checksum"):
        io.load(_rewrite(path, mutate_bytes=poke, fix_checksum=False))


def test_load_never_unpickles(saved, monkeypatch):
    path, out, x = saved

    def boom(*a, **k):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    with torch.no_grad():
        assert torch.equal(io.load(path)(x), out(x))


def test_incompatible_skeleton_is_refused_and_left_untouched(saved, tmp_path):
    path, _, _ = saved
    with_norm = tmp_path / "norm.sparse"
    io.save(extract(nn.Sequential(SparseLinear(6, 4, density=0.5), nn.LayerNorm(4)), "csr"), with_norm)
    for file, skeleton, match in (
        (path, MLP(784, (300, 50), 10), "shape"),
        (path, nn.Sequential(nn.Linear(3, 3)), "no module"),
        (with_norm, nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4)).double(), "float64"),
        (with_norm, nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(5)), "shape"),
        (with_norm, nn.Sequential(nn.Conv1d(6, 4, 1), nn.LayerNorm(4)), "shape|InferLinear"),
    ):
        before = {k: v.clone() for k, v in skeleton.state_dict().items()}
        modules = [type(m) for m in skeleton.modules()]
        with pytest.raises(io.SparseFileError, match=match):
            io.load(file, model=skeleton)
        assert [type(m) for m in skeleton.modules()] == modules
        assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


def test_save_is_atomic(saved, monkeypatch):
    path, out, x = saved
    original = Path(path).read_bytes()
    calls = {"n": 0}
    real = io._raw

    def failing(t, enc):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(t, enc)

    monkeypatch.setattr(io, "_raw", failing)
    with pytest.raises(OSError, match="disk full"):
        io.save(out, path)
    assert Path(path).read_bytes() == original  # the old file is intact
    assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]  # no temp file left
    monkeypatch.setattr(io, "_raw", real)
    with torch.no_grad():
        assert torch.equal(io.load(path)(x), out(x))


def test_header_records_versions_layers_and_metadata(saved, tmp_path):
    _, out, _ = saved
    io.save(out, tmp_path / "meta.sparse", metadata={"run": "test"})
    h = io.read_header(tmp_path / "meta.sparse")
    import sparse_engine

    assert h["library_version"] == sparse_engine.__version__ and h["metadata"] == {"run": "test"}
    assert set(h["layers"]) == {"hidden.0", "hidden.1", "out"}
    spec = h["layers"]["hidden.0"]["spec"]
    assert spec["type"] == "InferLinear" and spec["weight_shape"] == [300, 784] and spec["format"] == "csr"
    with pytest.raises(ValueError, match="metadata"):
        io.save(out, tmp_path / "bad.sparse", metadata={"n": 1})

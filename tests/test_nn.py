"""SparseLinear / SparseConv2d / SparseConv1d against plain torch layers and the reference math.

Reference for every layer: θ = where(M, m ⊙ w, 0) built from the layer's own factors (as dense leaf
tensors), then F.linear / F.conv with torch autograd. Gradients of compact storages are mapped to dense
through the layer's index before comparing.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.layout import BSRIndex, expand_block_mask
from sparse_engine.nn import SparseConv1d, SparseConv2d, SparseLinear

KINDS = ("masked", "signin", "pilot")
LAYOUTS = ("dense", "block", "csr", "bsr")
F64 = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ helpers


def block_aligned_mask(shape, block_shape, density=0.5, seed=0):
    n, k = shape[0], math.prod(shape[1:])
    nbr, nbc = -(-n // block_shape[0]), -(-k // block_shape[1])
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(nbr, nbc, generator=g) < density
    blocks.view(-1)[0] = True  # never empty
    return expand_block_mask(blocks, block_shape, (n, k)).reshape(shape)


def make(cls, args, kind, layout, density=0.4, dtype=torch.float64, block_shape=(4, 4), **kw):
    """A sparse layer of every (kind, layout): pilot with a compact/block layout gets an explicit mask."""
    weight_shape = _weight_shape(cls, args, kw)
    if layout in ("block", "bsr"):
        return cls(
            *args,
            kind=kind,
            layout=layout,
            mask=block_aligned_mask(weight_shape, block_shape),
            block_shape=block_shape,
            dtype=dtype,
            **kw,
        )
    if kind == "pilot" and layout != "dense":
        mask = torch.rand(weight_shape) < density
        return cls(*args, kind=kind, layout=layout, mask=mask, dtype=dtype, **kw)
    return cls(*args, kind=kind, layout=layout, density=density, block_shape=block_shape, dtype=dtype, **kw)


def _weight_shape(cls, args, kw):
    if cls is SparseLinear:
        return (args[1], args[0])
    nd = 2 if cls is SparseConv2d else 1
    ks = kw.get("kernel_size", args[2] if len(args) > 2 else None)
    ks = (ks,) * nd if isinstance(ks, int) else tuple(ks)
    return (args[1], args[0] // kw.get("groups", 1)) + ks


def reference_leaves(mod):
    """(w, m, mask) as dense leaf tensors holding the layer's current factors (m None for masked)."""
    w, m = mod._dense_factors()
    w = w.clone().requires_grad_(True)
    m = None if m is None else m.clone().requires_grad_(True)
    return w, m, mod.mask2d()


def reference_theta(mod, w, m, mask):
    theta = w if m is None else m * w
    if mask is not None:
        theta = torch.where(mask, theta, torch.zeros_like(theta))
    return theta.reshape(mod.weight_shape)


def dense_grad(mod, grad):
    """A parameter gradient in storage form -> dense (N, K)."""
    if mod.storage == "dense":
        return grad
    return mod.param.index.scatter(grad)


def check_grads(mod, x, y, y_ref, leaves, x_ref, tol):
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    w, m, _ = leaves
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(dense_grad(mod, mod.param.w.grad), w.grad.reshape(mod.param.shape2d), **tol)
    if m is not None:
        torch.testing.assert_close(
            dense_grad(mod, mod.param.m.grad), m.grad.reshape(mod.param.shape2d), **tol
        )
    if mod.storage == "bsr":  # zero padding of edge blocks is no weight: exactly zero gradient
        pad = ~mod.param.pad_mask
        assert torch.all(mod.param.w.grad[pad] == 0)
    mask = mod.mask2d()
    if mask is not None and mod.storage == "dense":  # pruned coordinates: exactly zero gradient
        assert torch.all(mod.param.w.grad[~mask] == 0)


# ----------------------------------------------------------------------------- plain torch parity


@pytest.mark.parametrize("bias", [True, False])
def test_linear_density1_is_nn_linear(bias):
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    plain = nn.Linear(13, 7, bias=bias)
    torch.manual_seed(seed)
    sparse = SparseLinear(13, 7, bias=bias)
    assert torch.equal(sparse.weight, plain.weight)
    x = torch.randn(3, 5, 13)
    y, y_ref = sparse(x), plain(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(sparse.param.w.grad, plain.weight.grad, rtol=1e-6, atol=1e-6)
    if bias:
        torch.testing.assert_close(sparse.bias.grad, plain.bias.grad, rtol=1e-6, atol=1e-6)


CONV2D_OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=1, bias=False),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=4, padding="same"),  # asymmetric "same" padding
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    dict(kernel_size=3, padding="valid", bias=False),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=1, groups=4, out=8),  # depthwise-like: in=4 channels, 4 groups
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=1, stride=2, padding_mode="replicate"),
    dict(kernel_size=3, padding=(1, 2), padding_mode="circular", dilation=(2, 1)),
]

CONV1D_OPTIONS = [
    dict(kernel_size=3),
    dict(kernel_size=4, padding="same", dilation=2),
    dict(kernel_size=3, stride=2, padding=2, padding_mode="circular", groups=2),
    dict(kernel_size=5, padding=2, padding_mode="reflect", bias=False),
]


def _conv_setup(nd, opts):
    opts = dict(opts)
    out = opts.pop("out", 6)
    cin = 4
    spatial = (9, 10) if nd == 2 else (11,)
    return cin, out, opts, spatial


@pytest.mark.parametrize("nd,opts", [(2, o) for o in CONV2D_OPTIONS] + [(1, o) for o in CONV1D_OPTIONS])
def test_conv_density1_is_torch_conv(nd, opts):
    cin, out, opts, spatial = _conv_setup(nd, opts)
    plain_cls, sparse_cls = (nn.Conv2d, SparseConv2d) if nd == 2 else (nn.Conv1d, SparseConv1d)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    plain = plain_cls(cin, out, **opts)
    torch.manual_seed(seed)
    sparse = sparse_cls(cin, out, **opts)
    assert torch.equal(sparse.weight, plain.weight)
    x = torch.randn(2, cin, *spatial)
    y, y_ref = sparse(x), plain(x)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(sparse.param.w.grad.reshape(plain.weight.shape), plain.weight.grad)
    # unbatched input, as torch accepts it
    assert torch.equal(sparse(x[0]), plain(x[0]))


@pytest.mark.parametrize("layout", ["dense", "csr", "bsr", "block"])
@pytest.mark.parametrize("nd,opts", [(2, o) for o in CONV2D_OPTIONS] + [(1, o) for o in CONV1D_OPTIONS])
def test_conv_sparse_equals_functional_conv(nd, opts, layout):
    """density < 1: output = F.conv with the masked θ; grads wrt m, w, bias, x = autograd of the reference."""
    cin, out, opts, spatial = _conv_setup(nd, opts)
    cls = SparseConv2d if nd == 2 else SparseConv1d
    mod = make(cls, (cin, out), "signin", layout, **opts)
    w, m, mask = reference_leaves(mod)
    x = torch.randn(2, cin, *spatial, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = mod(x)
    plain = mod.to_dense()
    conv = F.conv2d if nd == 2 else F.conv1d
    theta = reference_theta(mod, w, m, mask)
    bias = None if mod.bias is None else mod.bias.detach().clone().requires_grad_(True)
    if plain.padding_mode != "zeros":
        y_ref = conv(
            F.pad(x_ref, plain._reversed_padding_repeated_twice, mode=plain.padding_mode),
            theta,
            bias,
            plain.stride,
            0,
            plain.dilation,
            plain.groups,
        )
    else:
        y_ref = conv(x_ref, theta, bias, plain.stride, plain.padding, plain.dilation, plain.groups)
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(plain(x_ref.detach()), y_ref.detach(), **F64)
    check_grads(mod, x, y, y_ref, (w, m, mask), x_ref, F64)
    if bias is not None:
        torch.testing.assert_close(mod.bias.grad, bias.grad, **F64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(13, 7), (1, 1), (33, 129)])
def test_linear_output_and_grads_vs_reference(kind, layout, shape):
    k, n = shape
    mod = make(SparseLinear, (k, n), kind, layout)
    w, m, mask = reference_leaves(mod)
    bias = mod.bias.detach().clone().requires_grad_(True)
    x = torch.randn(3, 5, k, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = mod(x)
    y_ref = F.linear(x_ref, reference_theta(mod, w, m, mask), bias)
    torch.testing.assert_close(y, y_ref, **F64)
    check_grads(mod, x, y, y_ref, (w, m, mask), x_ref, F64)
    torch.testing.assert_close(mod.bias.grad, bias.grad, **F64)
    assert (mod.param.m is None) == (kind == "masked")


def test_masked_theta_is_exactly_zero_off_mask_and_density_exact():
    for layout in ("dense", "csr"):
        mod = SparseLinear(50, 40, kind="signin", density=0.25, layout=layout, seed=3)
        mask = mod.dense_mask()
        assert int(mask.sum()) == round(0.25 * 2000) == mod.nnz()
        assert torch.all(mod.weight[~mask] == 0)
        assert mod.density() == pytest.approx(0.25)
    conv = SparseConv2d(8, 16, 3, kind="masked", density=0.1, seed=1)
    assert conv.nnz() == round(0.1 * 16 * 8 * 9)
    # the seed decides the mask
    a = SparseLinear(20, 20, density=0.3, seed=5).dense_mask()
    b = SparseLinear(20, 20, density=0.3, seed=5).dense_mask()
    c = SparseLinear(20, 20, density=0.3, seed=6).dense_mask()
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_agree(kind):
    """dense / block / csr / bsr holding the same weights and block-aligned mask: same outputs and grads."""
    plain = nn.Linear(37, 23).double()
    mask = block_aligned_mask((23, 37), (8, 8))
    x = torch.randn(6, 37, dtype=torch.float64)
    g = torch.randn(6, 23, dtype=torch.float64)
    outs = {}
    for layout in LAYOUTS:
        mod = SparseLinear.from_dense(plain, kind=kind, mask=mask, layout=layout, block_shape=(8, 8))
        xi = x.clone().requires_grad_(True)
        y = mod(xi)
        y.backward(g)
        outs[layout] = (
            y.detach(),
            xi.grad,
            dense_grad(mod, mod.param.w.grad),
            mod.bias.grad,
            None if mod.param.m is None else dense_grad(mod, mod.param.m.grad),
        )
    for layout in LAYOUTS[1:]:
        for a, b in zip(outs["dense"], outs[layout]):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(a, b, **F64)


# ------------------------------------------------------------------------------ conversions


@pytest.mark.parametrize("layout", ["dense", "csr", "bsr", "block"])
def test_from_dense_to_dense_roundtrip(layout):
    plain = nn.Linear(19, 11, dtype=torch.float64)
    mask = block_aligned_mask((11, 19), (4, 4)) if layout in ("block", "bsr") else torch.rand(11, 19) < 0.5
    for kind in KINDS:
        mod = SparseLinear.from_dense(plain, kind=kind, mask=mask, layout=layout, block_shape=(4, 4))
        assert mod.param.w.dtype == torch.float64 and mod.bias.dtype == torch.float64
        back = mod.to_dense()
        assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float64
        expect = torch.where(mask, plain.weight, torch.zeros_like(plain.weight))
        tol = dict(rtol=0, atol=0) if kind == "masked" else dict(rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(back.weight, expect, **tol)
        assert torch.equal(back.bias, plain.bias)
        assert back.bias is not plain.bias and mod.bias is not plain.bias  # copies, not shared storage
    plain_conv = nn.Conv2d(
        4,
        6,
        (3, 2),
        stride=2,
        padding=(1, 0),
        dilation=(1, 2),
        groups=2,
        bias=False,
        padding_mode="replicate",
    )
    mod = SparseConv2d.from_dense(plain_conv, kind="signin", density=0.5)
    back = mod.to_dense()
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(back, attr) == getattr(plain_conv, attr), attr
    assert back.bias is None
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(back(x), mod(x))
    c1 = nn.Conv1d(3, 5, 3, padding="same")
    mod1 = SparseConv1d.from_dense(c1, kind="masked")
    assert torch.equal(mod1.to_dense().weight, c1.weight)
    x1 = torch.randn(2, 3, 8)
    assert torch.equal(mod1(x1), c1(x1))
    with pytest.raises(TypeError, match="module must be an nn.Linear"):
        SparseLinear.from_dense(plain_conv)
    with pytest.raises(TypeError, match="module must be an Conv2d"):
        SparseConv2d.from_dense(plain)


def test_weight_property_is_theta_and_differentiable():
    mod = SparseLinear(9, 4, kind="signin", density=0.5, layout="csr", dtype=torch.float64)
    weight = mod.weight
    assert weight.shape == (4, 9) and weight.dtype == torch.float64 and weight.device == mod.param.w.device
    torch.testing.assert_close(weight, mod.to_dense().weight)
    (weight**2).sum().backward()
    assert mod.param.w.grad is not None and mod.param.m.grad is not None
    with pytest.raises(AttributeError):
        mod.weight = torch.zeros(4, 9)
    assert "weight" not in dict(mod.named_parameters())


# ------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: SparseLinear(0, 3), "in_features must be a positive int"),
        (lambda: SparseLinear(3, -1), "out_features must be a positive int"),
        (lambda: SparseLinear(3, 3, density=1.5), r"density must be in \(0, 1\], got 1.5"),
        (lambda: SparseLinear(3, 3, density=0.0), r"density must be in \(0, 1\]"),
        (lambda: SparseLinear(3, 3, density=float("nan")), r"density must be in \(0, 1\]"),
        (lambda: SparseLinear(3, 3, kind="rigl"), "kind must be one of"),
        (lambda: SparseLinear(3, 3, layout="coo"), "layout must be one of"),
        (lambda: SparseLinear(3, 3, beta=-1.0), "beta must be a finite number"),
        (lambda: SparseLinear(3, 3, block_shape=(0, 4)), "block_shape must be a pair"),
        (
            lambda: SparseLinear(3, 4, mask=torch.ones(3, 4, dtype=torch.bool)),
            "mask must have the weight's shape",
        ),
        (lambda: SparseLinear(3, 4, mask=torch.ones(4, 3)), "mask must have dtype torch.bool"),
        (
            lambda: SparseLinear(3, 4, mask=torch.ones(4, 3, dtype=torch.bool), density=0.5),
            "either mask or density",
        ),
        (
            lambda: SparseLinear(
                8, 8, layout="block", block_shape=(4, 4), mask=torch.eye(8, dtype=torch.bool)
            ),
            "mask must be block-aligned",
        ),
        (lambda: SparseLinear(3, 3, kind="pilot", density=0.5, layout="csr"), "needs a mask"),
        (lambda: SparseConv2d(6, 4, 3, groups=4), "groups must divide in_channels"),
        (lambda: SparseConv2d(4, 6, 3, groups=4), "groups must divide out_channels"),
        (lambda: SparseConv2d(4, 4, 3, groups=0), "groups must be a positive int"),
        (lambda: SparseConv2d(0, 4, 3), "in_channels must be a positive int"),
        (lambda: SparseConv2d(4, 4, 0), "kernel_size must be an int >= 1"),
        (lambda: SparseConv2d(4, 4, (3, 3, 3)), "kernel_size must be"),
        (lambda: SparseConv2d(4, 4, 3, padding=-1), "padding must be an int >= 0"),
        (lambda: SparseConv2d(4, 4, 3, padding="full"), "padding must be 'same', 'valid'"),
        (lambda: SparseConv2d(4, 4, 3, stride=2, padding="same"), "padding='same' needs stride 1"),
        (lambda: SparseConv2d(4, 4, 3, padding_mode="mirror"), "padding_mode must be one of"),
        (
            lambda: SparseConv2d(4, 4, 3, mask=torch.ones(4, 4, 3, dtype=torch.bool)),
            "mask must have the weight's shape",
        ),
    ],
)
def test_bad_arguments_name_the_argument(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_inputs_name_input():
    lin = SparseLinear(5, 3, density=0.5)
    with pytest.raises(ValueError, match=r"input must have last dim 5 \(in_features\), got shape \(2, 4\)"):
        lin(torch.randn(2, 4))
    with pytest.raises(ValueError, match="input must have the layer's dtype"):
        lin(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        lin([1.0] * 5)
    conv = SparseConv2d(4, 6, 3, density=0.5)
    with pytest.raises(ValueError, match=r"input must have 4 channels \(in_channels\)"):
        conv(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="input must be 4-D"):
        conv(torch.randn(2, 4, 8, 8, 1))
    csr = SparseConv2d(4, 6, 3, density=0.5, layout="csr")
    with pytest.raises(ValueError, match="input is too small"):
        csr(torch.randn(2, 4, 2, 2))
    conv1 = SparseConv1d(4, 6, 3)
    with pytest.raises(ValueError, match=r"input must have 4 channels"):
        conv1(torch.randn(2, 5, 8))


# ------------------------------------------------------------------ unusual but valid inputs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_noncontiguous_and_empty_batch(layout):
    lin = make(SparseLinear, (12, 10), "signin", layout)
    base = torch.randn(12, 8, dtype=torch.float64)
    x = base.t()  # (8, 12), non-contiguous
    assert not x.is_contiguous()
    theta = lin.weight.detach()
    torch.testing.assert_close(lin(x), F.linear(x, theta, lin.bias.detach()), **F64)
    xs = torch.randn(4, 24, dtype=torch.float64)[:, ::2]  # strided
    torch.testing.assert_close(lin(xs), F.linear(xs, theta, lin.bias.detach()), **F64)
    empty = torch.randn(0, 12, dtype=torch.float64, requires_grad=True)
    y = lin(empty)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert empty.grad.shape == (0, 12)
    assert torch.all(lin.param.w.grad == 0)
    conv = make(SparseConv2d, (4, 6), "signin", layout, kernel_size=3, padding=1)
    xc = torch.randn(2, 9, 9, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last view
    yc = conv(xc)
    torch.testing.assert_close(yc, F.conv2d(xc, conv.weight.detach(), conv.bias.detach(), padding=1), **F64)
    ye = conv(torch.randn(0, 4, 9, 9, dtype=torch.float64, requires_grad=True))
    assert ye.shape == (0, 6, 9, 9)
    ye.sum().backward()


# ------------------------------------------------------------------------ copies and checkpoints


def _all_tensors(mod):
    return {**dict(mod.named_parameters()), **{k: v for k, v in mod.named_buffers() if v is not None}}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deepcopy_pickle_state_dict(layout):
    for cls, args, kw, x in (
        (SparseLinear, (10, 9), {}, torch.randn(3, 10, dtype=torch.float64)),
        (SparseConv2d, (4, 6), dict(kernel_size=3, padding=1), torch.randn(2, 4, 5, 5, dtype=torch.float64)),
    ):
        mod = make(cls, args, "signin", layout, **kw)
        with torch.no_grad():
            mod.param.w.mul_(1.5)  # differ from a fresh module's init
            mod.param.beta.fill_(0.37)
        y = mod(x)
        for clone in (copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
            assert torch.equal(clone(x), y)
            for name, t in _all_tensors(mod).items():
                assert torch.equal(_all_tensors(clone)[name], t), name
            assert clone.layout == mod.layout and clone.kind == mod.kind
        buf = io.BytesIO()
        torch.save(mod.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf)
        fresh = make(cls, args, "signin", layout, **kw)
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), y)
        for name, t in mod.state_dict().items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(fresh.state_dict()[name], t), name
        assert float(fresh.param.beta) == 0.37


def test_state_dict_into_module_with_other_mask_and_nnz():
    src = SparseLinear(30, 20, kind="signin", density=0.3, layout="csr", seed=1)
    dst = SparseLinear(30, 20, kind="signin", density=0.1, layout="csr", seed=2)
    w_obj = dst.param.w
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.dense_mask(), src.dense_mask())
    assert dst.param.w is w_obj  # Parameter objects kept
    x = torch.randn(4, 30)
    assert torch.equal(dst(x), src(x))
    # another storage: a dense-layout checkpoint into a csr module (converted back to csr after load)
    dense = SparseLinear(30, 20, kind="signin", density=0.3, layout="dense", seed=4)
    dst.load_state_dict(dense.state_dict())
    assert dst.storage == "csr"
    assert torch.equal(dst.dense_mask(), dense.dense_mask())
    torch.testing.assert_close(dst(x), dense(x))
    # pilot: no mask in the module, a pruned (masked) checkpoint
    pilot = SparseLinear(30, 20, kind="pilot", density=0.2)
    pruned = copy.deepcopy(pilot)
    pruned.set_mask(torch.rand(20, 30) < 0.2)
    pilot.load_state_dict(pruned.state_dict())
    assert torch.equal(pilot.dense_mask(), pruned.dense_mask())
    assert torch.equal(pilot(x), pruned(x))


def test_block_layout_rebuilds_index_when_mask_changes():
    mod = SparseLinear(
        16,
        16,
        kind="masked",
        layout="block",
        block_shape=(4, 4),
        mask=block_aligned_mask((16, 16), (4, 4), 0.5, seed=1),
        dtype=torch.float64,
    )
    x = torch.randn(3, 16, dtype=torch.float64)
    first = mod._block_index().nnzb
    new_mask = block_aligned_mask((16, 16), (4, 4), 0.5, seed=7)
    mod.set_mask(new_mask)
    index = mod._block_index()
    assert torch.equal(index.to_mask(), new_mask)
    assert isinstance(index, BSRIndex)
    torch.testing.assert_close(mod(x), F.linear(x, mod.weight.detach(), mod.bias.detach()), **F64)
    # an in-place edit of the mask buffer is noticed too
    with torch.no_grad():
        mod.param.mask.zero_()
        mod.param.mask[:4, :4] = True
    assert mod._block_index().nnzb == 1
    assert first >= 1
    with pytest.raises(ValueError, match="block-aligned"):
        mod.set_mask(torch.eye(16, dtype=torch.bool))
    csr = SparseLinear(8, 8, density=0.5, layout="csr")
    with pytest.raises(RuntimeError, match="set_mask\\(\\) needs dense storage"):
        csr.set_mask(torch.ones(8, 8, dtype=torch.bool))


def test_pilot_records_target_density_and_has_no_mask():
    mod = SparseLinear(10, 10, kind="pilot", density=0.2)
    assert mod.param.mask is None and mod.target_density == 0.2 and mod.density() == 1.0
    assert "target_density=0.2" in repr(mod)
    conv = SparseConv2d(3, 4, 3, kind="pilot", density=0.05)
    assert conv.target_density == 0.05 and conv.dense_mask() is None


def test_to_device_and_dtype_move_everything():
    mod = SparseLinear(6, 5, kind="signin", density=0.5, layout="bsr", block_shape=(2, 2))
    mod = mod.double()
    assert mod.param.w.dtype == torch.float64 and mod.bias.dtype == torch.float64
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(mod(x), F.linear(x, mod.weight.detach(), mod.bias.detach()), **F64)


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_autocast_computes_like_torch_layers(layout):
    """Under autocast a sparse layer behaves like nn.Linear / nn.Conv2d: bf16 compute, fp32 gradients."""
    lin = SparseLinear(24, 16, kind="signin", density=0.5, layout=layout)
    plain = lin.to_dense()
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        y_ref = plain(x)
        y_bf16_in = lin(x.to(torch.bfloat16))  # a bf16 activation from the previous autocast layer
    assert y.dtype == y_ref.dtype == y_bf16_in.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert lin.param.w.grad.dtype == torch.float32 and lin.param.m.grad.dtype == torch.float32
    assert lin.bias.grad is not None
    conv = SparseConv2d(4, 6, 3, padding=1, kind="signin", density=0.5, layout=layout)
    plain_conv = conv.to_dense()
    xc = torch.randn(2, 4, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yc, yc_ref = conv(xc), plain_conv(xc)
    assert yc.dtype == yc_ref.dtype == torch.bfloat16
    torch.testing.assert_close(yc.float(), yc_ref.float(), rtol=3e-2, atol=3e-2)
    yc.float().sum().backward()
    assert conv.param.w.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="input must have the layer's dtype"):
        lin(x.to(torch.bfloat16))  # outside autocast the dtype must match

"""fused_step: one in-place optimizer step (SGD with momentum / Nesterov, AdamW, PILoT α, mask).

* The spec (``fused_step_ref``) and every backend against torch.optim.SGD / AdamW step by step over
  20 steps, comparing the parameter and every state buffer after each step.
* Every backend against ``fused_step_ref`` with masks, α, several dtypes.
* The mask contract (test_invariants.py item 5): pruned coordinates keep their value, get exactly zero
  state, and a NaN gradient there is ignored.
* The Triton multi-tensor kernel: whole blocks (no per-lane bounds) and partial ones, tensors at odd
  addresses (no alignment hint for them), and, under ``-m aot``, its 16-byte vector loads on sm_90.
* The Triton single-tensor (flat and strided) and Sign-In kernels: whole blocks and the partial last one
  at sizes that are no multiple of 16, against the reference and the all-masked path, and, under
  ``-m aot``, vector loads on sm_90 at such sizes.
"""
from __future__ import annotations

import itertools
import os
import re

import pytest
import torch
from _backends import DEVICE_DTYPES, make_mask, over_backends, randn, require, run_on
from _tolerances import assert_close

from sparse_engine.ops import backends
from sparse_engine import ops
from sparse_engine.ops.reference import fused_step_ref

IMPL = ("fused_step",)
F64 = torch.float64


def _lr(v):
    return torch.tensor(v, dtype=F64)


def _step(param, grad, buf1, buf2, mask, lr, step, kind, **h):
    """ops.fused_step with torch.optim's defaults for what ``h`` leaves out."""
    ops.fused_step(param, grad, buf1, buf2, mask, _lr(lr), step, kind, **h)


def _ref(param, grad, buf1, buf2, mask, lr, step, kind, **h):
    full = dict(momentum=0.0, dampening=0.0, nesterov=False, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, alpha=0.0, maximize=False) | h
    fused_step_ref(param, grad, buf1, buf2, mask, _lr(lr), step, kind, **full)


# ------------------------------------------------------------------------------- hand-computed cases


def test_hand_sgd_momentum_and_nesterov():
    for nesterov, expected in ((False, (0.9, 0.65)), (True, (0.85, 0.525))):
        p, buf = torch.tensor([1.0], dtype=F64), torch.zeros(1, dtype=F64)
        # step 1: buf = g = 1; step 2: buf = 0.5·1 + 2 = 2.5; Nesterov uses g + 0.5·buf
        for step, g in ((1, 1.0), (2, 2.0)):
            _ref(p, torch.tensor([g], dtype=F64), buf, None, None, 0.1, step, "sgd", momentum=0.5,
                 nesterov=nesterov)
            assert p.item() == pytest.approx(expected[step - 1], rel=1e-15), (nesterov, step)
        assert buf.item() == pytest.approx(2.5, rel=1e-15)


def test_hand_sgd_weight_decay_alpha_maximize():
    p = torch.tensor([2.0], dtype=F64)
    # g' = 1 + 2·α·p + λ·p = 1 + 2 + 0.2 = 3.2; p = 2 − 0.1·3.2
    _ref(p, torch.tensor([1.0], dtype=F64), None, None, None, 0.1, 1, "sgd", weight_decay=0.1, alpha=0.5)
    assert p.item() == pytest.approx(1.68, rel=1e-15)
    p = torch.tensor([2.0], dtype=F64)
    # maximize negates g first: g' = −1 + 0.2 = −0.8; p = 2 + 0.08
    _ref(p, torch.tensor([1.0], dtype=F64), None, None, None, 0.1, 1, "sgd", weight_decay=0.1, maximize=True)
    assert p.item() == pytest.approx(2.08, rel=1e-15)


def test_hand_adamw_first_step():
    p, m1, m2 = torch.tensor([1.0], dtype=F64), torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64)
    # decayed = 1·(1 − 0.1·0.5) = 0.95; exp_avg = 0.1·2 = 0.2; exp_avg_sq = 0.001·4 = 0.004;
    # denom = sqrt(0.004)/sqrt(0.001) = 2; p = 0.95 − (0.1/0.1)·0.2/2 = 0.85
    _ref(p, torch.tensor([2.0], dtype=F64), m1, m2, None, 0.1, 1, "adamw", weight_decay=0.5, eps=0.0)
    assert p.item() == pytest.approx(0.85, rel=1e-14)
    assert m1.item() == pytest.approx(0.2, rel=1e-15) and m2.item() == pytest.approx(0.004, rel=1e-15)


def test_hand_mask_keeps_value_zeroes_state_ignores_nan():
    p = torch.tensor([1.0, 1.0, 1.0], dtype=F64)
    buf = torch.tensor([5.0, 5.0, 5.0], dtype=F64)
    mask = torch.tensor([True, False, True])
    g = torch.tensor([1.0, float("nan"), 1.0], dtype=F64)
    _ref(p, g, buf, None, mask, 0.1, 2, "sgd", momentum=0.5, weight_decay=0.1)
    # active: g' = 1 + 0.1 = 1.1; buf = 2.5 + 1.1 = 3.6; p = 1 − 0.36
    torch.testing.assert_close(p, torch.tensor([0.64, 1.0, 0.64], dtype=F64), rtol=1e-15, atol=0)
    torch.testing.assert_close(buf, torch.tensor([3.6, 0.0, 3.6], dtype=F64), rtol=1e-15, atol=0)
    assert p[1] == 1.0 and buf[1] == 0.0  # exactly


# --------------------------------------------------------------------------- vs torch.optim, 20 steps

SGD_CONFIGS = [dict(momentum=mo, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
               for mo, d, n, wd, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 1e-2),
                                                         (False, True))
               if not (n and (mo == 0.0 or d != 0.0)) and not (mo == 0.0 and d != 0.0)]  # (no-op dampening)
ADAMW_CONFIGS = [dict(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=wd, maximize=mx)
                 for wd, mx in itertools.product((0.0, 1e-2), (False, True))]


def _config_id(c):
    return "-".join(f"{k}{v}" for k, v in c.items() if v not in (0.0, False))


def _vs_torch(backend, dtype, kind, h, steps=20, lr=0.05):
    require(backend, IMPL, "cpu", dtype)
    p0 = randn(3, 17, dtype=dtype)
    ref_p = p0.clone().requires_grad_(True)
    if kind == "sgd":
        opt = torch.optim.SGD([ref_p], lr=lr, foreach=False, **h)
    else:
        opt = torch.optim.AdamW([ref_p], lr=lr, betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                                weight_decay=h["weight_decay"], maximize=h["maximize"], foreach=False)
    p = p0.clone()
    use1 = kind == "adamw" or h.get("momentum", 0.0) != 0.0
    buf1 = torch.zeros_like(p) if use1 else None
    buf2 = torch.zeros_like(p) if kind == "adamw" else None
    for step in range(1, steps + 1):
        g = randn(3, 17, dtype=dtype)
        ref_p.grad = g.clone()
        opt.step()
        with run_on(backend):
            _step(p, g, buf1, buf2, None, lr, step, kind, **h)
        state = opt.state[ref_p]
        assert_close(p, ref_p.detach(), dtype, f"param after step {step}", elementwise=True)
        if kind == "sgd" and use1:
            assert_close(buf1, state["momentum_buffer"], dtype, f"momentum_buffer after step {step}",
                         elementwise=True)
        if kind == "adamw":
            assert_close(buf1, state["exp_avg"], dtype, f"exp_avg after step {step}", elementwise=True)
            assert_close(buf2, state["exp_avg_sq"], dtype, f"exp_avg_sq after step {step}", elementwise=True)
            assert int(state["step"]) == step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("h", SGD_CONFIGS, ids=_config_id)
@over_backends
def test_sgd_matches_torch_optim_20_steps(backend, dtype, h):
    _vs_torch(backend, dtype, "sgd", h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("h", ADAMW_CONFIGS, ids=_config_id)
@over_backends
def test_adamw_matches_torch_optim_20_steps(backend, dtype, h):
    _vs_torch(backend, dtype, "adamw", h)


# ------------------------------------------------------------------------------------ backend grid

GRID_CONFIGS = [
    ("sgd", dict()),
    ("sgd", dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, alpha=1e-3)),
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=5e-4, maximize=True)),
    ("adamw", dict(weight_decay=1e-2, alpha=1e-3)),
    ("adamw", dict(beta1=0.8, beta2=0.95, eps=1e-6, maximize=True)),
]
SHAPES = [(1,), (129, 7), (5, 3, 3, 3)]


@pytest.mark.parametrize("density", [None, 0.0, 0.5, 1.0], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("config", GRID_CONFIGS, ids=lambda c: c[0] + "-" + _config_id(c[1]))
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@over_backends
def test_matches_reference(backend, device, dtype, config, shape, density):
    kind, h = config
    require(backend, IMPL, device, dtype)
    mask = make_mask(shape, density, device)
    p = randn(*shape, dtype=dtype, device=device)
    use1 = kind == "adamw" or h.get("momentum", 0.0) != 0.0
    # non-zero initial state, so that zeroing at pruned coordinates is visible
    b1 = randn(*shape, dtype=dtype, device=device).abs() if use1 else None
    b2 = randn(*shape, dtype=dtype, device=device).abs() if kind == "adamw" else None
    rp, rb1, rb2 = (None if t is None else t.clone() for t in (p, b1, b2))
    p_before = p.clone()
    # atol relative to the magnitudes that enter the update, not only to the result: a state of one
    # element can be a near-cancellation of β·buf and (1-β)·g, far smaller than either
    scale = max([float(t.abs().max()) for t in (p, b1, b2) if t is not None and t.numel()], default=0.0)
    for step in (1, 2, 3):
        g = randn(*shape, dtype=dtype, device=device)
        if g.numel():
            scale = max(scale, float(g.abs().max()))
        if mask is not None and not bool(mask.all()):
            g = torch.where(mask, g, torch.full_like(g, float("nan")))  # must be ignored there
        with run_on(backend):
            _step(p, g, b1, b2, mask, 0.01, step, kind, **h)
        _ref(rp, g, rb1, rb2, mask, 0.01, step, kind, **h)
    for name, t, r in (("param", p, rp), ("buf1", b1, rb1), ("buf2", b2, rb2)):
        if t is not None:
            own = float(r.abs().max()) if r.numel() else 0.0
            assert_close(t, r, dtype, name, device=device, elementwise=True, scale=max(scale, own))
    if mask is not None:
        off = ~mask
        assert torch.equal(p[off], p_before[off]), "pruned coordinates of param changed"
        for name, t in (("buf1", b1), ("buf2", b2)):
            if t is not None:
                assert bool((t[off] == 0).all()), f"{name} not exactly zero at pruned coordinates"


def test_half_param_with_fp32_state_reference():
    """Buffers may have their own dtype (fp32 state for bf16/fp16 parameters); the update is computed in
    fp32 and rounded once into the parameter."""
    for dtype in (torch.float16, torch.bfloat16):
        p32 = randn(64)
        p = p32.to(dtype)
        b1, b2 = torch.zeros(64), torch.zeros(64)
        g = randn(64).to(dtype)
        _ref(p, g, b1, b2, None, 1e-2, 1, "adamw", weight_decay=0.1)
        pf, f1, f2 = p32.to(dtype).float(), torch.zeros(64), torch.zeros(64)
        _ref(pf, g.float(), f1, f2, None, 1e-2, 1, "adamw", weight_decay=0.1)
        assert torch.equal(p, pf.to(dtype))  # one rounding of the fp32 result
        assert torch.equal(b1, f1) and torch.equal(b2, f2)


# ------------------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@over_backends
def test_opcheck(backend, kind):
    require(backend, IMPL, "cpu", torch.float32)
    p, g, b1, b2 = randn(5, 6), randn(5, 6), randn(5, 6), randn(5, 6).abs()
    mask = make_mask((5, 6), 0.5)
    args = (p, g, b1, b2 if kind == "adamw" else None, mask, _lr(0.1), 2, kind, 0.9, 0.0, False, 0.9, 0.999,
            1e-8, 1e-2, 1e-3, False)
    with run_on(backend):
        torch.library.opcheck(torch.ops.sparse_engine.fused_step.default, args)


# --------------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("case,exc,needle", [
    ("param_int", ValueError, "param must be a floating-point tensor"),
    ("grad_shape", ValueError, r"grad must have shape \(4, 5\)"),
    ("grad_dtype", ValueError, "grad must have dtype torch.float32"),
    ("grad_device", ValueError, "grad must be on cpu"),
    ("buf1_missing", ValueError, r"buf1 \(the momentum buffer\) must be given"),
    ("buf2_missing", ValueError, r"buf2 \(exp_avg_sq\) must be given"),
    ("buf1_shape", ValueError, r"buf1 must have shape \(4, 5\)"),
    ("buf1_device", ValueError, "buf1 must be on cpu"),
    ("param_noncontig", ValueError, "param must be dense in memory"),
    ("buf1_noncontig", ValueError, "buf1 must be dense in memory with param's strides"),
    ("mask_dtype", ValueError, "mask must have dtype torch.bool"),
    ("mask_shape", ValueError, r"mask must have shape \(4, 5\)"),
    ("lr_dim", ValueError, "lr must be 0-D"),
    ("lr_float", TypeError, "lr must be a torch.Tensor"),
    ("lr_int", ValueError, "lr must be a floating-point 0-dim tensor"),
    ("kind", ValueError, "kind must be one of"),
    ("step0", ValueError, "step must be an int >= 1"),
    ("momentum_neg", ValueError, "momentum must be a finite number >= 0"),
    ("wd_nan", ValueError, "weight_decay must be a finite number >= 0"),
    ("alpha_neg", ValueError, "alpha must be a finite number >= 0"),
    ("nesterov", ValueError, "nesterov=True needs momentum > 0 and dampening = 0"),
    ("beta1", ValueError, r"beta1 must be in \[0, 1\)"),
    ("beta2", ValueError, r"beta2 must be in \[0, 1\)"),
])
def test_bad_input_names_the_argument(case, exc, needle):
    p, g, b1, b2 = randn(4, 5), randn(4, 5), torch.zeros(4, 5), torch.zeros(4, 5)
    a = dict(param=p, grad=g, buf1=b1, buf2=None, mask=None, lr=_lr(0.1), step=1, kind="sgd")
    h = dict(momentum=0.9)
    bad = {
        "param_int": (dict(param=torch.ones(4, 5, dtype=torch.int64)), {}),
        "grad_shape": (dict(grad=randn(5, 4)), {}),
        "grad_dtype": (dict(grad=g.double()), {}),
        "grad_device": (dict(grad=g.to("meta")), {}),
        "buf1_missing": (dict(buf1=None), {}),
        "buf2_missing": (dict(kind="adamw"), {}),
        "buf1_shape": (dict(buf1=torch.zeros(20)), {}),
        "buf1_device": (dict(buf1=b1.to("meta")), {}),
        "param_noncontig": (dict(param=randn(4, 10)[:, ::2]), {}),  # a slice: no dim order makes it dense
        "buf1_noncontig": (dict(buf1=torch.zeros(5, 4).t()), {}),
        "mask_dtype": (dict(mask=torch.ones(4, 5)), {}),
        "mask_shape": (dict(mask=torch.ones(5, 4, dtype=torch.bool)), {}),
        "lr_dim": (dict(lr=torch.tensor([0.1])), {}),
        "lr_float": (dict(lr=0.1), {}),
        "lr_int": (dict(lr=torch.tensor(1)), {}),
        "kind": (dict(kind="adam"), {}),
        "step0": (dict(step=0), {}),
        "momentum_neg": ({}, dict(momentum=-0.1)),
        "wd_nan": ({}, dict(weight_decay=float("nan"))),
        "alpha_neg": ({}, dict(alpha=-1.0)),
        "nesterov": ({}, dict(momentum=0.9, dampening=0.1, nesterov=True)),
        "beta1": (dict(kind="adamw", buf2=b2), dict(beta1=1.0)),
        "beta2": (dict(kind="adamw", buf2=b2), dict(beta2=-0.5)),
    }[case]
    a, h = a | bad[0], h | bad[1]
    before = p.clone()
    with pytest.raises(exc, match=needle):
        ops.fused_step(a["param"], a["grad"], a["buf1"], a["buf2"], a["mask"], a["lr"], a["step"], a["kind"],
                       **h)
    assert torch.equal(p, before), "a rejected call must not touch the weights"


@pytest.mark.parametrize("multi", [False, True], ids=["one", "multi"])
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_channels_last_params_step_like_contiguous_ones(kind, multi):
    # model.to(memory_format=torch.channels_last) makes conv weights dense in another dim order; their
    # grads and (zeros_like) buffers share those strides. The step must update them in place, bit for bit
    # as on contiguous copies, whether grad and mask share the order or not.
    cl = torch.channels_last
    p = randn(8, 3, 3, 3).contiguous(memory_format=cl)
    b1 = randn(8, 3, 3, 3).contiguous(memory_format=cl)
    b2 = randn(8, 3, 3, 3).abs().contiguous(memory_format=cl)
    g, mask = randn(8, 3, 3, 3), make_mask((8, 3, 3, 3), 0.5).contiguous(memory_format=cl)
    b2 = b2 if kind == "adamw" else None
    ref = [t.contiguous() if t is not None else None for t in (p, b1, b2)]
    h = dict(momentum=0.9, weight_decay=1e-2, alpha=1e-3)
    if multi:
        for _ in range(2):
            # a second, contiguous tensor in the same list
            q, qb1, qb2 = randn(2, 5), torch.zeros(2, 5), None if b2 is None else torch.zeros(2, 5)
            ops.fused_step_multi([p, q], [g, randn(2, 5)], [b1, qb1], [b2, qb2], [mask, None], _lr(0.1), 1,
                                 kind, alphas=[1e-3, 0.0], momentum=0.9, weight_decay=1e-2)
    else:
        for _ in range(2):
            ops.fused_step(p, g, b1, b2, mask, _lr(0.1), 1, kind, **h)
    for _ in range(2):
        ops.fused_step(ref[0], g.contiguous(), ref[1], ref[2], mask.contiguous(), _lr(0.1), 1, kind, **h)
    assert p.is_contiguous(memory_format=cl) and b1.is_contiguous(memory_format=cl)
    for got, want in zip((p, b1, b2), ref):
        if want is not None:
            assert torch.equal(got, want)


def test_non_contiguous_grad_and_mask_are_accepted():
    p, b = randn(4, 6), torch.zeros(4, 6)
    g, mask = randn(6, 4).t(), make_mask((6, 4), 0.5).t()
    rp, rb = p.clone(), b.clone()
    ops.fused_step(p, g, b, None, mask, _lr(0.1), 1, "sgd", momentum=0.9)
    ops.fused_step(rp, g.contiguous(), rb, None, mask.contiguous(), _lr(0.1), 1, "sgd", momentum=0.9)
    assert torch.equal(p, rp) and torch.equal(b, rb)


@over_backends
def test_empty_param(backend):
    p, g, b1, b2 = randn(0, 3), randn(0, 3), torch.zeros(0, 3), torch.zeros(0, 3)
    with backends.force(backend):
        ops.fused_step(p, g, b1, b2, None, _lr(0.1), 1, "adamw")
    assert p.shape == (0, 3)


# ------------------------------------------------------- Triton multi-tensor kernel: whole blocks, alignment
#
# The multi-tensor kernel steps whole blocks without per-lane bounds and, when its launcher found every
# address of a launch 16-byte aligned (constexpr ALIGNED), tells the compiler so: 16-byte vector loads
# and stores. A tensor at an address that is no multiple of 16 (a view at an odd storage offset) must go
# to a launch without the hint (a vector access there faults on a GPU) and still be stepped correctly.

def _triton_fused_step():
    """sparse_engine.kernels.fused_step, or a skip saying why its kernels cannot run here."""
    pytest.importorskip("triton", reason="triton is not installed: no Triton backend to test")
    from sparse_engine.kernels import _common
    from sparse_engine.kernels import fused_step as FS
    if not torch.cuda.is_available() and not _common.interpreting():
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: Triton kernels cannot run here")
    return FS


def _at_odd_address(t):
    """A copy of ``t`` one element into a fresh buffer: for every dtype here, no multiple of 16 bytes."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    buf[0] = True if t.dtype == torch.bool else 7
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


MULTI_BLOCK = 256  # small blocks, so that the interpreter meets whole blocks and partial ones cheaply
#: sizes: whole blocks only, whole blocks + a tail, a tail only, one block, 1 element
MULTI_SHAPES = [(2, 256), (700,), (3,), (16, 16), (1,)]
#: which operand of each tensor lies at an odd address (None: all aligned), by tensor index
ODD_CASES = {"aligned": [None] * 5, "odd": ["param", "grad", "buf1", "buf2", "mask"]}


@pytest.mark.parametrize("odd", list(ODD_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("config", [("sgd", dict(momentum=0.9, weight_decay=1e-2)),
                                    ("adamw", dict(weight_decay=1e-2, alpha=1e-3))], ids=lambda c: c[0])
def test_triton_multi_whole_blocks_and_alignment(config, dtype, odd):
    """prepare_multi's launches against the reference over whole and partial blocks, with every operand
    in turn at an odd address: the hint only where all addresses are aligned, and the same results."""
    FS = _triton_fused_step()
    kind, h = config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # an operand the kind does not use (buf2 of sgd) is not in the table: it cannot make a tensor odd
    odd_of = [None if (n == "buf2" and kind != "adamw") else n for n in ODD_CASES[odd]]
    ps, gs, b1s, b2s, masks, want, inputs = [], [], [], [], [], [], []
    for i, shape in enumerate(MULTI_SHAPES):
        mask = make_mask(shape, 0.5, device)
        t = dict(param=randn(*shape, dtype=dtype, device=device), grad=randn(*shape, dtype=dtype, device=device),
                 buf1=randn(*shape, dtype=torch.float32, device=device).abs(),
                 buf2=randn(*shape, dtype=torch.float32, device=device).abs(), mask=mask)
        t["grad"] = torch.where(mask, t["grad"], torch.full_like(t["grad"], float("nan")))  # ignored there
        if odd_of[i] is not None:
            t[odd_of[i]] = _at_odd_address(t[odd_of[i]])
        b2 = t["buf2"] if kind == "adamw" else None
        want.append([t["param"].clone(), t["buf1"].clone(), None if b2 is None else b2.clone()])
        inputs.append([x.clone() for x in (t["param"], t["grad"], t["buf1"], b2) if x is not None])
        _ref(want[-1][0], t["grad"], want[-1][1], want[-1][2], t["mask"], 0.01, 2, kind, **h)
        for lst, x in ((ps, t["param"]), (gs, t["grad"]), (b1s, t["buf1"]), (b2s, b2), (masks, t["mask"])):
            lst.append(x)
    hp = FS._Hyper(2, kind, **(dict(momentum=0.0, dampening=0.0, nesterov=False, beta1=0.9, beta2=0.999,
                                    eps=1e-8, weight_decay=0.0, alpha=0.0, maximize=False) | h))
    launches, host = FS.prepare_multi(ps, gs, b1s, b2s if kind == "adamw" else None, masks, _lr(0.01), hp,
                                      block=MULTI_BLOCK)
    # every launch holds the hint only if every address of its table is 16-byte aligned, and a tensor with
    # one odd operand lands in a launch without it
    by_addr = {p.data_ptr(): i for i, p in enumerate(ps)}
    for launch, tables in zip(launches, host):
        table = tables[0]
        assert launch.args["ALIGNED"] == bool((table % 16 == 0).all()), table
        for row in table.tolist():
            assert launch.args["ALIGNED"] == (odd_of[by_addr[row[0]]] is None), (row, odd_of)
    assert {la.args["ALIGNED"] for la in launches} == {n is None for n in odd_of}
    for launch in launches:
        launch.run()
    for i, (p, b1, b2, mask) in enumerate(zip(ps, b1s, b2s, masks)):
        # atol relative to the magnitudes that enter the update (as in test_matches_reference): a state of a
        # few elements can be a near-cancellation of β·buf and (1-β)·g, far smaller than either
        scale = max(float(torch.nan_to_num(t, nan=0.0).abs().max()) for t in inputs[i])
        for what, got, exp in (("param", p, want[i][0]), ("buf1", b1, want[i][1]), ("buf2", b2, want[i][2])):
            if exp is not None:
                assert_close(got, exp, got.dtype, f"tensor {i} {what}", device=device, elementwise=True,
                             scale=max(scale, float(exp.abs().max())))
        off = ~mask
        assert torch.equal(p[off], want[i][0][off]), f"tensor {i}: pruned coordinates of param changed"
        assert bool((b1[off] == 0).all()) and (b2 is None or bool((b2[off] == 0).all())), f"tensor {i} state"
    for i, name in enumerate(odd_of):  # the element in front of an odd view is left alone
        t = None if name is None else dict(param=ps[i], grad=gs[i], buf1=b1s[i], buf2=b2s[i], mask=masks[i])[name]
        if t is not None:
            neighbour = torch.as_strided(t, (1,), (1,), t.storage_offset() - 1).item()
            assert neighbour == (True if t.dtype == torch.bool else 7), f"tensor {i}: the element before {name}"


# ------------------------------------------ Triton single-tensor and Sign-In kernels: whole blocks, odd sizes
#
# Both kernels branch on whether a program's block (flat) or tile (strided, BLOCK_R x BLOCK_C) lies inside
# the tensor: whole ones run without per-lane bounds (vector accesses whatever the size), the last,
# partial one keeps them. Small blocks make the interpreter meet both, at sizes that are no multiple of
# 16; the results must be those of the reference, and bit for bit those of one masked block over the
# whole tensor (the path every size took before); nothing outside the tensor may be touched.

SENTINEL = 7.0


def _embedded(t, layout):
    """``t`` copied into a view inside a larger buffer filled with SENTINEL (True for bool).

    layout: "flat" (contiguous, SENTINEL after its end), "rows" (the first columns of a wider matrix:
    strided rows, unit column stride) or "cols" (a transposed view: unit row stride), both with
    SENTINEL in the extra columns / rows. Returns (view, buffer, view_of) with view_of(buffer) the view.
    """
    rows, cols = t.shape
    fill = True if t.dtype == torch.bool else SENTINEL
    if layout == "flat":
        buf = torch.full((t.numel() + 37,), fill, dtype=t.dtype)
        view_of = lambda b: b[: t.numel()].view(rows, cols)
    elif layout == "rows":
        buf = torch.full((rows, cols + 31), fill, dtype=t.dtype)
        view_of = lambda b: b[:, :cols]
    else:
        buf = torch.full((cols, rows + 3), fill, dtype=t.dtype)
        view_of = lambda b: b[:, :rows].t()
    view = view_of(buf)
    view.copy_(t)
    assert view.is_contiguous() == (layout == "flat")
    return view, buf, view_of


def _untouched_outside(buf, view_of, what):
    rest = buf.clone()
    fill = True if buf.dtype == torch.bool else SENTINEL
    view_of(rest).fill_(fill)
    assert bool((rest == fill).all()), f"{what}: an element outside the tensor was written"


def _cfg(block, block_r=1, block_c=1):
    import triton
    return triton.Config({"BLOCK": block, "BLOCK_R": block_r, "BLOCK_C": block_c}, num_warps=4, num_stages=1)


def _pow2(n):
    from sparse_engine.kernels._common import next_pow2
    return next_pow2(n)


def _whole_and_partial(n, block):
    """The sizes must give the kernel whole blocks and one partial block, at a size the divisibility
    hint does not cover."""
    assert n > block and n % block and n % 16, (n, block)


#: (parameter dtype, state dtype)
ODD_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)]
ODD_KINDS = [("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2, "alpha": 1e-3}),
             ("adamw", {"weight_decay": 1e-2, "alpha": 1e-3})]
_FULL_H = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
           "weight_decay": 0.0, "alpha": 0.0, "maximize": False}


def _hyper(FS, step, kind, h):
    return FS._Hyper(step, kind, **(_FULL_H | h))


def _dtype_id(d):
    return f"{str(d[0])[6:]}-state{str(d[1])[6:]}"


#: (kind config, dtypes, layout, shape): every small case, and 1000003 elements (16 blocks of 65536) once
SINGLE_ODD_CASES = [(c, d, layout, (37, 129)) for c in ODD_KINDS for d in ODD_DTYPES
                    for layout in ("flat", "rows", "cols")]
SINGLE_ODD_CASES.append((ODD_KINDS[1], ODD_DTYPES[0], "flat", (1, 1000003)))
SINGLE_ODD_IDS = [f"{c[0]}-{_dtype_id(d)}-{lay}-{r}x{k}" for c, d, lay, (r, k) in SINGLE_ODD_CASES]


@pytest.mark.parametrize("config,dtypes,layout,shape", SINGLE_ODD_CASES, ids=SINGLE_ODD_IDS)
def test_triton_single_whole_and_partial_blocks_odd_sizes(config, dtypes, layout, shape):
    """_fused_step_kernel with small blocks / tiles (flat and both strided layouts) against the reference
    and against one masked block over the whole tensor, at sizes that are no multiple of 16."""
    FS = _triton_fused_step()
    kind, h = config
    pdt, sdt = dtypes
    rows, cols = shape
    if layout == "flat":
        small, big = _cfg(256 if rows * cols < 10**5 else 65536), _cfg(_pow2(rows * cols))
        _whole_and_partial(rows * cols, small.kwargs["BLOCK"])
    else:
        small, big = _cfg(1, 8, 64), _cfg(1, _pow2(rows), _pow2(cols))
        _whole_and_partial(rows, 8)
        _whole_and_partial(cols, 64)
    mask = make_mask(shape, 0.5)
    grad = randn(*shape, dtype=pdt)
    grad = torch.where(mask, grad, torch.full_like(grad, float("nan")))  # ignored there
    start = {"param": randn(*shape, dtype=pdt), "buf1": randn(*shape, dtype=sdt).abs(),
             "buf2": randn(*shape, dtype=sdt).abs()}
    if kind != "adamw":
        start["buf2"] = None
    want = {k: None if v is None else v.clone() for k, v in start.items()}
    _ref(want["param"], grad, want["buf1"], want["buf2"], mask, 0.01, 2, kind, **h)
    hp = _hyper(FS, 2, kind, h)
    got = {}
    for label, cfg in (("small blocks", small), ("one block", big)):
        emb = {k: None if v is None else _embedded(v, layout) for k, v in start.items()}
        g, gbuf, gview = _embedded(grad, layout)
        q, qbuf, qview = _embedded(mask, layout)
        views = {k: None if e is None else e[0] for k, e in emb.items()}
        launch, copies = FS.prepare(views["param"], g, views["buf1"], views["buf2"], q, _lr(0.01), hp, cfg)
        assert not copies and launch.args["FLAT"] == (layout == "flat")
        launch.run()
        got[label] = {k: None if v is None else v.clone() for k, v in views.items()}
        for k, e in emb.items():
            if e is not None:
                _untouched_outside(e[1], e[2], f"{label}: {k}")
        _untouched_outside(gbuf, gview, f"{label}: grad")
        _untouched_outside(qbuf, qview, f"{label}: mask")
    for k, exp in want.items():
        if exp is None:
            continue
        small_k, big_k = got["small blocks"][k], got["one block"][k]
        assert_close(small_k, exp, exp.dtype, f"{k} (small blocks)", elementwise=True)
        assert torch.equal(small_k, big_k), f"{k}: whole blocks differ from the masked path"
    off = ~mask
    assert torch.equal(got["small blocks"]["param"][off], start["param"][off]), "pruned coordinates changed"


def _signin_ref(m, w, gm, gw, st, mask, step, kind, h, beta, state):
    """The Sign-In pair step as fused_step_ref on each factor, then signin_reset_ref ("keep" / "zero")."""
    from sparse_engine.ops.reference import signin_reset_ref
    m, w = m.clone(), w.clone()
    st = [None if t is None else t.clone() for t in st]
    _ref(m, gm, st[0], st[1], mask, 0.01, step, kind, **h)
    _ref(w, gw, st[2], st[3], mask, 0.01, step, kind, **h)
    if beta is not None:
        m, w = signin_reset_ref(m, w, mask, beta)
        if state == "zero":
            st = [None if t is None else torch.zeros_like(t) for t in st]
    return [m, w] + st


@pytest.mark.parametrize("reset", [None, "keep", "zero", "transform"])
@pytest.mark.parametrize("dtypes", ODD_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("config", ODD_KINDS, ids=lambda c: c[0])
def test_triton_signin_whole_and_partial_blocks_odd_sizes(config, dtypes, reset):
    """_fused_step_signin_kernel with small blocks against the reference (step, then reset with the state
    kept or zeroed) and, every reset mode, bit for bit against one masked block over the whole pair."""
    FS = _triton_fused_step()
    kind, h = config
    pdt, sdt = dtypes
    shape, block = (37, 129), 256
    _whole_and_partial(shape[0] * shape[1], block)
    mask = make_mask(shape, 0.5)
    m = (randn(*shape).abs() + 0.5).to(pdt)
    w, gm, gw = (randn(*shape, dtype=pdt) for _ in range(3))
    used = [True, kind == "adamw"] * 2
    st = [randn(*shape, dtype=sdt).abs() if u else None for u in used]
    beta = None if reset is None else 1.0
    state = reset or "keep"
    hp = _hyper(FS, 2, kind, h)
    got = {}
    for label, cfg in (("small blocks", _cfg(block)), ("one block", _cfg(_pow2(m.numel())))):
        emb = [None if t is None else _embedded(t, "flat") for t in [m, w] + st]
        views = [None if e is None else e[0] for e in emb]
        launch = FS.prepare_signin(views[0], views[1], gm, gw, views[2], views[3], views[4], views[5], mask,
                                   _lr(0.01), hp, beta, state, cfg)
        launch.run()
        got[label] = [None if v is None else v.clone() for v in views]
        for e, what in zip(emb, ("m", "w", "m_buf1", "m_buf2", "w_buf1", "w_buf2")):
            if e is not None:
                _untouched_outside(e[1], e[2], f"{label}: {what}")
    names = ("m", "w", "m_buf1", "m_buf2", "w_buf1", "w_buf2")
    # "transform": bit for bit against the masked path (test_triton_kernels checks that one against the
    # reference)
    want = [None] * 6
    if state != "transform":
        want = _signin_ref(m, w, gm, gw, st, mask, 2, kind, h, beta, state)
    for i, what in enumerate(names):
        small, big = got["small blocks"][i], got["one block"][i]
        if small is None:
            continue
        assert torch.equal(small, big), f"{what}: whole blocks differ from the masked path"
        if want[i] is not None:
            assert_close(small, want[i], small.dtype, f"{what} (small blocks)", elementwise=True)
    if beta is not None:  # pruned: m = sqrt(β), w = 0
        assert bool((got["small blocks"][0][~mask].float() == 1.0).all())
        assert bool((got["small blocks"][1][~mask] == 0).all())


@pytest.mark.aot
@pytest.mark.parametrize("family", ["multi", "single", "signin"])
def test_triton_vector_loads_sm90(family):
    """16-byte vector loads and stores (``ld/st.global...v4``) on sm_90. Multi-tensor kernel: every
    launch of the AOT plan whose tensors are aligned, none without the alignment hint. Single-tensor
    (flat and strided) and Sign-In kernels: the plan's launches at sizes that are no multiple of 16 (no
    divisibility hint on the size, so the masked path is scalar): their whole blocks are vectorised."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("AOT compile needs TRITON_INTERPRET=0 (run `TRITON_INTERPRET=0 pytest -m aot` in its own "
                    "process, as scripts/test.sh does)")
    pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
    from sparse_engine.kernels import _aot
    from sparse_engine.kernels import fused_step as FS
    checked = 0
    for name, launch, sweep in FS.aot_launches():
        if family == "multi" and not name.startswith("fused_step_multi-"):
            continue
        if family != "multi" and not (name.startswith(f"fused_step{'_signin' if family == 'signin' else ''}-")
                                      and name.endswith("-odd")):
            continue
        if family != "multi":  # the size really is no multiple of 16
            size = launch.args["numel"] if launch.args.get("FLAT", True) else launch.args["cols"]
            assert size % 16, f"{name}: size {size} is a multiple of 16"
        ptx = _aot.compile_launch(launch, _aot.plan_configs(launch, sweep)[0], 90).asm["ptx"]
        loads = len(re.findall(r"\bld\.global\S*\.v4\.", ptx))
        stores = len(re.findall(r"\bst\.global\S*\.v4\.", ptx))
        kind = name.split("-")[3]
        streams = 2 + ("mom0.9" in name) + 2 * (kind == "adamw")  # p, grad and the state the kind reads
        tensors = 2 if family == "signin" else 1  # the Sign-In kernel steps two factors
        if name.endswith("-unaligned"):
            assert loads == 0 and stores == 0, f"{name}: vector accesses without the alignment hint"
        else:
            assert family != "multi" or launch.args["ALIGNED"], name
            assert loads >= tensors * streams and stores >= tensors * (streams - 1), (
                f"{name}: {loads} v4 loads, {stores} v4 stores"
            )
        checked += 1
    least = {"multi": 20, "single": 15, "signin": 5}[family]
    assert checked >= least, f"only {checked} {family} launches checked"

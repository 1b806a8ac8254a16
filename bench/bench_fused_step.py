"""fused_step: the optimizer step as one memory pass, against torch.optim, in GB/s and % of copy bandwidth.

    python bench/bench_fused_step.py            # GPU: 100M parameters, SGD-momentum and AdamW (~30 s)
    python bench/bench_fused_step.py --quick    # tiny; on CPU under the Triton interpreter (CI smoke)

Cases (random mask of density 0.1, i.e. 90 % sparse, on every weight):
* ``100M``       one 10000 × 10000 tensor (100M parameters: a GPT-2-medium/large-sized model's weights in one
                 flat buffer), fp32 parameters and state; SGD momentum 0.9 + weight decay, AdamW;
* ``100M bf16``  the same with bf16 parameters / gradients and fp32 optimizer state, AdamW;
* ``1000 small`` 1000 tensors of 10k parameters (biases / norms / small layers): per-launch overhead;
* ``signin pair`` a Sign-In (m, w) pair of 2 × 50M: step both factors and reset to β in one pass vs
                 two steps + a separate reset.

Providers:
* ``naive``     torch.optim (default for-each implementation) over the dense tensors, then the mask applied
                to the parameter and the state (p.mul_(mask), buf.mul_(mask)): what users write today;
* ``torch``     torch.optim with ``fused=True`` where torch has it (no mask: a lower bound for what torch
                can do, not the same work);
* ``ours``      sparse_engine.kernels.fused_step (one pass, mask included); ``ours_multi`` the multi-tensor
                launch, ``ours_loop`` one launch per tensor; ``ours_signin`` the fused Sign-In pair step.
GB/s counts the bytes the step must move once: read p, g, state, mask; write p, state. ``copy`` is the
measured device-to-device copy bandwidth (read + write) of this run; ``pct_copy`` in the note is ours
against it. Target (GPU): ours ≥ 80 % of the measured copy bandwidth on 100M parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

DENSITY = 0.1
LR, MOMENTUM, WD = 0.01, 0.9, 1e-4

REGISTRY = common.Registry()


class Case:
    """One or many tensors with grads, a mask each, and state for ``kind``."""

    def __init__(self, shapes, dtype, state_dtype, kind, device):
        import torch

        self.kind, self.device = kind, device
        self.params = [common.rand(*s, dtype=dtype, device=device) for s in shapes]
        self.grads = [common.rand(*s, dtype=dtype, device=device) for s in shapes]
        self.masks = [torch.rand(*s, device=device) < DENSITY for s in shapes]
        self.buf1 = [common.rand(*s, dtype=state_dtype, device=device) for s in shapes]
        self.buf2 = (
            [common.rand(*s, dtype=state_dtype, device=device).abs() for s in shapes]
            if kind == "adamw"
            else [None] * len(shapes)
        )
        self.lr = torch.tensor(LR, device=device)
        self.numel = sum(p.numel() for p in self.params)
        es, ss = self.params[0].element_size(), self.buf1[0].element_size()
        n_state = 2 if kind == "adamw" else 1
        # read p, g, state, mask; write p, state
        self.nbytes = self.numel * (2 * es + es + 2 * n_state * ss + 1)

    def hyper(self):
        return dict(momentum=MOMENTUM if self.kind == "sgd" else 0.0, dampening=0.0, nesterov=False, beta1=0.9,
                    beta2=0.999, eps=1e-8, weight_decay=WD, alpha=0.0, maximize=False)


def _torch_optimizer(c: Case, **extra):
    import torch

    params = [torch.nn.Parameter(p.detach().clone()) for p in c.params]
    for p, g in zip(params, c.grads):
        p.grad = g
    if c.kind == "sgd":
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, **extra)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **extra)
    opt.step()  # creates the state
    return params, opt


@REGISTRY.add("naive", "torch.optim (for-each) + re-apply the mask to param and state")
def _naive(c: Case, pass_: str):
    if any(p.dtype != b.dtype for p, b in zip(c.params, c.buf1)):
        raise common.Unavailable(
            "torch.optim keeps the state in the parameter dtype (no fp32 state for bf16)"
        )
    params, opt = _torch_optimizer(c)
    masks = c.masks

    def run():
        opt.step()
        for p, q in zip(params, masks):
            p.data.mul_(q)
            for s in opt.state[p].values():
                if hasattr(s, "dim") and s.dim() > 0:
                    s.mul_(q)

    return run


@REGISTRY.add("torch", "torch.optim fused=True, no mask (torch's lower bound)")
def _torch(c: Case, pass_: str):
    if c.device != "cuda":
        raise common.Unavailable("fused=True needs CUDA tensors")
    if any(p.dtype != b.dtype for p, b in zip(c.params, c.buf1)):
        raise common.Unavailable(
            "torch.optim keeps the state in the parameter dtype (no fp32 state for bf16)"
        )
    try:
        params, opt = _torch_optimizer(c, fused=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise common.Unavailable(f"fused=True: {e}")
    return opt.step


@REGISTRY.add("ours", "sparse_engine fused_step, one launch per tensor (mask included)")
def _ours(c: Case, pass_: str):
    fs = common.kernels("fused_step")
    h = c.hyper()
    state = [(b1, b2) for b1, b2 in zip(c.buf1, c.buf2)]
    step = [2]

    def run():
        for p, g, (b1, b2), q in zip(c.params, c.grads, state, c.masks):
            fs.fused_step(p, g, b1, b2, q, c.lr, step[0], c.kind, **h)

    return run


@REGISTRY.add("ours_multi", "sparse_engine fused_step_multi: every tensor in one launch")
def _ours_multi(c: Case, pass_: str):
    fs = common.kernels("fused_step")
    h = c.hyper()
    return lambda: fs.fused_step_multi(
        c.params, c.grads, c.buf1, c.buf2 if c.kind == "adamw" else None, c.masks, c.lr, 2, c.kind, **h
    )


def _signin_case(n, dtype, device):
    import torch

    c = Case([(n,), (n,)], dtype, torch.float32, "sgd", device)
    c.params[0] = c.params[0].abs() + 0.5  # m > 0
    # m, w, g_m, g_w, their momentum, the mask: read all, write m, w, 2 buffers
    es = c.params[0].element_size()
    c.nbytes = n * (4 * es + 2 * 4 + 1 + 2 * es + 2 * 4)
    return c


@REGISTRY.add("ours_signin", "fused_step_signin: step m and w and reset to beta in one pass")
def _ours_signin(c: Case, pass_: str):
    fs = common.kernels("fused_step")
    (m, w), (gm, gw), (bm, bw) = c.params, c.grads, c.buf1
    return lambda: fs.fused_step_signin(
        m,
        w,
        gm,
        gw,
        bm,
        None,
        bw,
        None,
        c.masks[0],
        c.lr,
        2,
        "sgd",
        momentum=MOMENTUM,
        weight_decay=WD,
        beta=1.0,
        state="keep",
    )


@REGISTRY.add("ours_unfused", "two fused_step calls + signin_reset (three passes)")
def _ours_unfused(c: Case, pass_: str):
    fs = common.kernels("fused_step")
    sr = common.kernels("signin_reset")
    (m, w), (gm, gw), (bm, bw) = c.params, c.grads, c.buf1
    h = c.hyper()

    def run():
        fs.fused_step(m, gm, bm, None, c.masks[0], c.lr, 2, "sgd", **h)
        fs.fused_step(w, gw, bw, None, c.masks[0], c.lr, 2, "sgd", **h)
        nm, nw = sr.signin_reset(m, w, c.masks[0], 1.0)
        m.copy_(nm)
        w.copy_(nw)

    return run


def main(argv=None) -> int:
    args = common.setup(__doc__.splitlines()[0], argv)
    import torch

    res = common.Results("fused_step", args)
    f32, b16 = torch.float32, torch.bfloat16
    if args.quick:
        big, n_small, small, pair = (64, 96), 5, (700,), 5000
    else:
        big, n_small, small, pair = (10000, 10000), 1000, (10000,), 50_000_000
    copy = common.copy_bandwidth_gbps(args.device, nbytes=(1 << 30) if not args.quick else (1 << 20))
    res.add(
        case="copy",
        model="device-to-device copy",
        shape="1 GiB" if not args.quick else "1 MiB",
        dtype="float32",
        density="",
        provider="copy",
        pass_="step",
        note=f"{copy:.1f} GB/s read+write",
    )
    res.rows[-1]["gbps"] = f"{copy:.1f}"

    cases = [
        (
            "100M sgd",
            "one 10000x10000 weight, SGD momentum",
            [big],
            f32,
            f32,
            "sgd",
            ["naive", "torch", "ours"],
        ),
        ("100M adamw", "one 10000x10000 weight, AdamW", [big], f32, f32, "adamw", ["naive", "torch", "ours"]),
        ("100M bf16 adamw", "bf16 params, fp32 state, AdamW", [big], b16, f32, "adamw", ["naive", "ours"]),
        (
            "1000 small sgd",
            "1000 tensors of 10k (biases, norms)",
            [small] * n_small,
            f32,
            f32,
            "sgd",
            ["naive", "torch", "ours", "ours_multi"],
        ),
    ]
    for name, model, shapes, dtype, sdt, kind, providers in cases:
        c = Case(shapes, dtype, sdt, kind, args.device)
        kw = dict(
            case=name,
            model=model,
            shape=f"{len(shapes)}x{shapes[0]} ({c.numel} params)",
            dtype=f"{str(dtype)[6:]}/{str(sdt)[6:]}",
            density=DENSITY,
        )
        res.measure(REGISTRY, providers, kw, "step", (c,), nbytes=lambda p, c=c: c.nbytes)
        _note_pct(res, name, copy)
        del c
        res.flush()
    c = _signin_case(pair if not args.quick else 5000, f32, args.device)
    kw = dict(
        case="signin pair",
        model="Sign-In (m, w) pair, SGD momentum + reset",
        shape=f"2x{c.params[0].numel()}",
        dtype="float32/float32",
        density=DENSITY,
    )
    res.measure(REGISTRY, ["ours_unfused", "ours_signin"], kw, "step", (c,), nbytes=lambda p, c=c: c.nbytes)
    _note_pct(res, "signin pair", copy)
    res.write()
    return 1 if res.errors else 0


def _note_pct(res, case: str, copy: float) -> None:
    for r in res.rows:
        if r["case"] == case and r["gbps"] and r["provider"].startswith("ours"):
            r["note"] = (r["note"] + f"; pct_copy {100 * float(r['gbps']) / copy:.0f}%").strip("; ")


if __name__ == "__main__":
    sys.exit(main())

"""masked_linear (dense + mask layout): forward and forward+backward against the ways people do it today.

    python bench/bench_masked_linear.py                 # GPU: the shapes below, bf16 (~1 min incl. autotune)
    python bench/bench_masked_linear.py --quick         # tiny; on CPU under the Triton interpreter (CI smoke)

Shapes (weight (N, K) = (out, in), T tokens = batch × sequence):
* gpt2-mlp-up   Linear(768, 3072): the MLP up-projection of GPT-2 small / ViT-B/16 / BERT-base,
                T = 4096 and 16384 (e.g. 8 × 512 … 16 × 1024 tokens);
* 7b-proj       Linear(4096, 4096): an attention projection of a 7B-class transformer (LLaMA-7B),
                T = 4096 and 16384.
Mask density 0.5 (random); the dense+mask layout does the same work at any density.

Providers (same x, m, w, mask, dY in every one; bf16 with fp32 accumulation):
* ``dense``         torch F.linear on a dense weight (cuBLAS), autograd backward: the speed of no sparsity;
* ``naive``         what a user writes today: θ = m * w * mask in the forward, F.linear, autograd backward
                    into m and w;
* ``reparam_cublas`` sparse_engine's reparam kernels around cuBLAS: θ materialised once (one pass), the
                    three GEMMs in cuBLAS, dθ mapped to (g_m, g_w) in one pass;
* ``ours``          the fused Triton kernels: θ tiles built from (m, w, M) inside the matmul, dX with the same
                    kernel, dθ = dYᵀx with an epilogue writing g_m and g_w (θ and dθ never in memory).
Passes: ``fwd`` (forward only) and ``fwd+bwd`` (forward, then dX, g_m, g_w). TFLOP/s counts 2·T·N·K per
GEMM (1 forward, 3 forward+backward). Ratios vs dense / naive are computed from this run only.
Targets (GPU): ours fwd+bwd within 1.05× of dense, ≥ 1.2× faster than naive.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

CASES = [  # (case name, model comment, N, K, T)
    ("gpt2-mlp-up T=4096", "GPT-2 small / ViT-B MLP Linear(768, 3072)", 3072, 768, 4096),
    ("gpt2-mlp-up T=16384", "GPT-2 small / ViT-B MLP Linear(768, 3072)", 3072, 768, 16384),
    ("7b-proj T=4096", "LLaMA-7B attention projection Linear(4096, 4096)", 4096, 4096, 4096),
    ("7b-proj T=16384", "LLaMA-7B attention projection Linear(4096, 4096)", 4096, 4096, 16384),
]
QUICK_CASES = [("tiny 96x64 T=48", "smoke test", 96, 64, 48), ("odd 70x33 T=7", "smoke test", 70, 33, 7)]
DENSITY = 0.5

REGISTRY = common.Registry()


class Case:
    def __init__(self, n, k, t, dtype, device):
        import torch

        self.n, self.k, self.t = n, k, t
        self.x = common.rand(t, k, dtype=dtype, device=device)
        self.m = common.rand(n, k, dtype=dtype, device=device)
        self.w = common.rand(n, k, dtype=dtype, device=device)
        self.mask = torch.rand(n, k, device=device) < DENSITY
        self.gy = common.rand(t, n, dtype=dtype, device=device)


REGISTRY.add("dense", "torch F.linear, dense weight (cuBLAS), autograd")(common.linear_dense)
REGISTRY.add("naive", "theta = m * w * mask in the forward, F.linear, autograd")(common.linear_naive)


@REGISTRY.add("reparam_cublas", "sparse_engine reparam kernels + cuBLAS GEMMs")
def _reparam_cublas(c: Case, pass_: str):
    import torch.nn.functional as F

    rp = common.kernels("reparam")

    def fwd():
        return F.linear(c.x, rp.reparam_fwd(c.m, c.w, c.mask))

    if pass_ == "fwd":
        return fwd

    def run():
        theta = rp.reparam_fwd(c.m, c.w, c.mask)
        F.linear(c.x, theta)
        c.gy @ theta  # dX
        rp.reparam_bwd(c.gy.t() @ c.x, c.m, c.w, c.mask)  # dθ -> (g_m, g_w)

    return run


@REGISTRY.add("ours", "fused Triton masked_linear (theta / dtheta never in memory)")
def _ours(c: Case, pass_: str):
    ml = common.kernels("masked_linear")
    if pass_ == "fwd":
        return lambda: ml.masked_linear_fwd(c.x, c.m, c.w, c.mask, None)

    def run():
        ml.masked_linear_fwd(c.x, c.m, c.w, c.mask, None)
        ml.masked_linear_bwd(c.gy, c.x, c.m, c.w, c.mask)

    return run


def main(argv=None) -> int:
    args = common.setup(__doc__.splitlines()[0], argv)
    import torch

    dtype = torch.bfloat16 if args.cuda else torch.float32  # the interpreter computes bf16 in fp32 anyway
    res = common.Results("masked_linear", args)
    for name, model, n, k, t in QUICK_CASES if args.quick else CASES:
        c = Case(n, k, t, dtype, args.device)
        kw = dict(case=name, model=model, shape=f"T={t} N={n} K={k}", dtype=str(dtype)[6:], density=DENSITY)
        for pass_, gemms in (("fwd", 1), ("fwd+bwd", 3)):
            res.measure(
                REGISTRY,
                ["dense", "naive", "reparam_cublas", "ours"],
                kw,
                pass_,
                (c,),
                flops=lambda p, g=gemms: 2.0 * g * t * n * k,
            )
        del c
        res.flush()
    res.write()
    if args.cuda:
        ml = common.kernels("masked_linear")
        common.print_tuning(
            "masked_linear",
            {f"mm{k}": v for k, v in ml._masked_mm.items()}
            | {f"dtheta{k}": v for k, v in ml._masked_dtheta.items()},
        )
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())

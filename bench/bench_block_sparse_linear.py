"""block_sparse_linear (BSR blocks over dense m, w): work ∝ non-empty blocks, against dense and torch BSR.

    python bench/bench_block_sparse_linear.py           # GPU: the cases below, bf16 (~1-2 min incl. autotune)
    python bench/bench_block_sparse_linear.py --quick   # tiny; on CPU under the Triton interpreter (CI smoke)

Cases (weight (N, K) = (out, in), T tokens, random block mask at the given block density):
* 7b-proj    Linear(4096, 4096) of a 7B-class transformer (LLaMA-7B attention projection), T = 8192,
             64×64 blocks at block density 0.5 / 0.1 / 0.05 (50-95 % block sparsity), and 32×32 and
             128×128 blocks at 0.1;
* gpt2-mlp-up Linear(768, 3072) of GPT-2 small / ViT-B, T = 4096, 64×64 blocks at 0.1.

Providers (bf16, fp32 accumulation):
* ``dense``     torch F.linear on the dense weight (cuBLAS), autograd backward: no sparsity at all;
* ``naive``     θ = m * w * block_mask in the forward, F.linear, autograd backward into m, w;
* ``torch_bsr`` forward only: F.linear(x, θ_bsr) with θ_bsr = θ.to_sparse_bsr(block) built once outside the
                timed region (torch's best case: in training θ changes every step); no backward in torch;
* ``ours``      the Triton kernels: forward and dX loop over non-empty blocks only (crow/col, ccol/row_t),
                dθ by SDDMM over the non-empty blocks with the g_m/g_w epilogue.
TFLOP/s counts the work each provider does: 2·T·N·K per GEMM for dense / naive, 2·T·nnzb·bn·bk for the
block-sparse ones. Targets (GPU): ours fwd+bwd ≥ 3× faster than dense at 90 % block sparsity (64×64,
4096×4096, T = 8192); ours forward not slower than torch_bsr.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

LLAMA = "LLaMA-7B attention projection Linear(4096, 4096)"
GPT2 = "GPT-2 small / ViT-B MLP Linear(768, 3072)"
CASES = [  # (model, N, K, T, block, block density)
    (LLAMA, 4096, 4096, 8192, 64, 0.5),
    (LLAMA, 4096, 4096, 8192, 64, 0.1),
    (LLAMA, 4096, 4096, 8192, 64, 0.05),
    (LLAMA, 4096, 4096, 8192, 32, 0.1),
    (LLAMA, 4096, 4096, 8192, 128, 0.1),
    (GPT2, 3072, 768, 4096, 64, 0.1),
]
QUICK_CASES = [("smoke", 128, 96, 40, 32, 0.5), ("smoke", 70, 50, 9, 16, 0.3)]

REGISTRY = common.Registry()


class Case:
    def __init__(self, n, k, t, block, density, dtype, device):
        import torch

        from sparse_engine.layout import BSRIndex

        nbr, nbc = -(-n // block), -(-k // block)
        blocks = torch.zeros(nbr * nbc, dtype=torch.bool)
        blocks[torch.randperm(nbr * nbc)[: max(1, round(density * nbr * nbc))]] = True
        self.index = BSRIndex.from_block_mask(blocks.reshape(nbr, nbc), (block, block), (n, k)).to(device)
        self.block = block
        self.nnzb = self.index.nnzb
        self.mask = self.index.to_mask()
        self.x = common.rand(t, k, dtype=dtype, device=device)
        self.m = common.rand(n, k, dtype=dtype, device=device)
        self.w = common.rand(n, k, dtype=dtype, device=device)
        self.gy = common.rand(t, n, dtype=dtype, device=device)

    def idx(self):
        i = self.index
        return (i.crow, i.col, i.row, i.ccol, i.row_t, i.perm, self.block, self.block)


REGISTRY.add("dense", "torch F.linear, dense weight (cuBLAS), autograd")(common.linear_dense)
REGISTRY.add("naive", "theta = m * w * block_mask, F.linear, autograd")(common.linear_naive)


@REGISTRY.add("torch_bsr", "F.linear(x, theta.to_sparse_bsr(block)), forward only, conversion untimed")
def _torch_bsr(c: Case, pass_: str):
    import torch.nn.functional as F

    if pass_ != "fwd":
        raise common.Unavailable("torch has no backward for a BSR weight in F.linear")
    theta = (c.m * c.w * c.mask).detach()
    try:
        bsr = theta.to_sparse_bsr((c.block, c.block))
        F.linear(c.x, bsr)  # fails here when torch has no kernel for this device / dtype
    except Exception as e:  # torch's BSR path may lack a kernel for this device / dtype / block
        raise common.Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
    return lambda: F.linear(c.x, bsr)


@REGISTRY.add("ours", "Triton block_sparse_linear (loops over non-empty blocks only)")
def _ours(c: Case, pass_: str):
    bsl = common.kernels("block_sparse_linear")
    idx = c.idx()
    if pass_ == "fwd":
        return lambda: bsl.block_sparse_linear_fwd(c.x, c.m, c.w, None, *idx)

    def run():
        bsl.block_sparse_linear_fwd(c.x, c.m, c.w, None, *idx)
        bsl.block_sparse_linear_bwd(c.gy, c.x, c.m, c.w, *idx)

    return run


def main(argv=None) -> int:
    args = common.setup(__doc__.splitlines()[0], argv)
    import torch

    dtype = torch.bfloat16 if args.cuda else torch.float32
    res = common.Results("block_sparse_linear", args)
    for model, n, k, t, block, density in QUICK_CASES if args.quick else CASES:
        c = Case(n, k, t, block, density, dtype, args.device)
        sparse_mac = t * c.nnzb * block * block
        name = f"{n}x{k} T={t} b{block} d{density}"
        kw = dict(
            case=name,
            model=model,
            shape=f"T={t} N={n} K={k} block={block} nnzb={c.nnzb}",
            dtype=str(dtype)[6:],
            density=density,
        )
        for pass_, gemms in (("fwd", 1), ("fwd+bwd", 3)):

            def flops(p, g=gemms):
                return 2.0 * g * (t * n * k if p in ("dense", "naive") else sparse_mac)

            res.measure(REGISTRY, ["dense", "naive", "torch_bsr", "ours"], kw, pass_, (c,), flops=flops)
        # the target compares ours with torch BSR too: vs_bsr goes in the note of our forward row
        rows = {(r["provider"], r["pass"]): r for r in res.rows if r["case"] == name}
        ours, bsr = rows.get(("ours", "fwd")), rows.get(("torch_bsr", "fwd"))
        if ours and bsr and ours["time_ms"] and bsr["time_ms"]:
            ours["note"] = (
                ours["note"] + f"; vs torch_bsr {float(bsr['time_ms']) / float(ours['time_ms']):.3f}"
            ).strip("; ")
        del c
        res.flush()
    res.write()
    if args.cuda:
        bsl = common.kernels("block_sparse_linear")
        common.print_tuning(
            "block_sparse_linear",
            {f"fwd{k}": v for k, v in bsl._bsr_fwd.items()}
            | {f"dx{k}": v for k, v in bsl._bsr_dx.items()}
            | {f"dtheta{k}": v for k, v in bsl._bsr_dtheta.items()},
        )
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())

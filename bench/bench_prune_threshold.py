"""Magnitude-pruning threshold (k-th largest |θ|): torch.kthvalue against the Triton radix select.

    python bench/bench_prune_threshold.py           # GPU: 1M / 10M / 100M scores, fp32 and bf16 (~20 s)
    python bench/bench_prune_threshold.py --quick   # tiny; on CPU under the Triton interpreter (CI smoke)

Sizes: 1M (one 1024×1024 layer, a per-layer threshold), 10M, 100M (a global threshold over a
GPT-2-medium-sized model flattened into one score vector); k keeps 10 % (90 % sparsity).

Providers:
* ``naive``  torch.kthvalue(scores, n − k + 1): the reference (reference.prune_threshold_ref);
* ``topk``   torch.topk(scores, k).values[-1] (another way people write it);
* ``ours``   sparse_engine.kernels.prune_threshold.kth_largest (multi-block radix select).
Results must agree exactly (checked before timing). GB/s counts one read of the scores. The backend
registers ``prune_threshold`` only if ours is faster than torch.kthvalue (see kernels/prune_threshold.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

KEEP = 0.1
REGISTRY = common.Registry()


class Case:
    def __init__(self, n, dtype, device):
        self.scores = common.rand(n, dtype=dtype, device=device).abs()
        self.n = n
        self.k = max(1, int(KEEP * n))


@REGISTRY.add("naive", "torch.kthvalue (the reference)")
def _naive(c: Case, pass_: str):
    return lambda: c.scores.kthvalue(c.n - c.k + 1).values


@REGISTRY.add("topk", "torch.topk(k).values[-1]")
def _topk(c: Case, pass_: str):
    return lambda: c.scores.topk(c.k).values[-1]


@REGISTRY.add("ours", "Triton radix select kth_largest")
def _ours(c: Case, pass_: str):
    pt = common.kernels("prune_threshold")
    want = c.scores.kthvalue(c.n - c.k + 1).values
    got = pt.kth_largest(c.scores, c.k)
    if not bool((got == want).all()):
        raise RuntimeError(f"kth_largest = {got.item()} but torch.kthvalue = {want.item()}")
    return lambda: pt.kth_largest(c.scores, c.k)


def main(argv=None) -> int:
    args = common.setup(__doc__.splitlines()[0], argv)
    import torch

    res = common.Results("prune_threshold", args)
    sizes = [1000, 5000] if args.quick else [1 << 20, 10_000_000, 100_000_000]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for n in sizes:
            c = Case(n, dtype, args.device)
            kw = dict(
                case=f"n={n} {str(dtype)[6:]}",
                model="global |theta| threshold",
                shape=f"{n}",
                dtype=str(dtype)[6:],
                density=KEEP,
            )
            res.measure(
                REGISTRY,
                ["naive", "topk", "ours"],
                kw,
                "select",
                (c,),
                nbytes=lambda p, c=c: c.n * c.scores.element_size(),
            )
            del c
            res.flush()
    res.write()
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())

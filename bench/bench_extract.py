"""Inference speed and file size of extracted sparse models against the dense model and torch.sparse CSR.

For each model (LeNet-300-100 MLP, the small ResNet CNN, a transformer encoder, and with ``--models bert`` a
BERT-shaped encoder built from a transformers config, 6 layers, hidden 384) at 80 / 90 / 95 %
sparsity (random ERK masks through ``sparsify(method="static")``: inference cost does not depend on how
the weights were trained), on this machine's CPU:

* providers: ``dense``   the original torch model (nn.Linear / nn.Conv2d, the baseline);
             ``auto``    ``extract(model, "auto")``: per layer the format measured fastest here;
             ``csr``     ``extract(model, "csr")``: every layer on sparse_engine's compact kernel;
             ``csr_op``  the same model with the lean inference entry declined (the registered op's
                         implementation per layer, the former path): the A/B of that entry;
             ``torch_csr`` the same θ as ``torch.sparse_csr_tensor`` + ``torch.sparse.mm`` per layer
                         (what a user writes today without sparse_engine);
* latency at batch 1 (median of repeated calls after warm-up, ms) and throughput at batch 64
  (samples/s), all under ``torch.inference_mode()``;
* file sizes: ``torch.save(dense.state_dict())`` against ``sparse_engine.save`` of the auto model.

Writes ``runs/bench/bench_extract.csv`` (unless --out) (one row per model × density × provider, with machine,
versions and commit) and ``bench_extract.txt`` (the printed ratio table).

Run: ``python bench/bench_extract.py [--quick] [--models mlp,cnn,transformer] [--densities 0.2,0.1,0.05]``
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sparse_engine
from common import cpu_name, git_commit  # bench/, the script's folder
from sparse_engine.ops import backends
from sparse_engine.export import io
from sparse_engine.export.extract import extract, reformat, report
from sparse_engine.export.infer import InferConv2d, InferLinear
from sparse_engine.app.models import MLP, SmallResNet, TinyTransformer
from sparse_engine.nn import sparsify

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runs", "bench")  # scratch

# Models: (name, constructor, input maker). The transformer is larger than the CLI's d=64 toy so that
# its projections have the shapes of a small real encoder (d=256, 4 heads, MLP 1024, 64 tokens); a
# byte-level vocabulary (256) keeps the dense embedding, which sparsify leaves alone, small.
class BertEncoder(nn.Module):
    """A BERT-shaped encoder from a transformers config (6 layers, hidden 384, 6 heads, MLP 1536), random
    init, returning the last hidden state: the shapes of a small real encoder (MiniLM-class). Inputs are
    32-token sequences; a 1000-word vocabulary keeps the dense embedding (sparsify leaves it alone) small."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                         intermediate_size=1536, max_position_embeddings=64)
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state


MODELS = {
    "mlp": (lambda: MLP(784, (300, 100), 10), lambda b: torch.randn(b, 784)),  # LeNet-300-100, Fashion-MNIST
    "cnn": (lambda: SmallResNet(1, 10), lambda b: torch.randn(b, 1, 28, 28)),  # the CLI's ResNet, 28x28
    "transformer": (lambda: TinyTransformer(256, 64, 10, d=256, heads=4, layers=2),
                    lambda b: torch.randint(0, 256, (b, 64))),
    "bert": (BertEncoder, lambda b: torch.randint(0, 1000, (b, 32))),  # opt-in: --models bert
}


class TorchCSR(nn.Module):
    """One layer as torch.sparse CSR: y = (θ_csr @ xᵀ)ᵀ + b (conv: im2col first). The user's alternative."""

    def __init__(self, mod):
        super().__init__()
        theta = mod.dense_weight().reshape(mod.shape2d)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": that is the point of comparing
            warnings.simplefilter("ignore")
            self.theta = theta.to_sparse_csr()
        self.bias = None if mod.bias is None else mod.bias.detach()
        self.mod = mod  # for the conv geometry only

    def _mm(self, x2):
        y = torch.sparse.mm(self.theta, x2.t()).t()
        return y if self.bias is None else y + self.bias

    def forward(self, x):
        mod = self.mod
        if isinstance(mod, InferLinear):
            lead = x.shape[:-1]
            return self._mm(x.reshape(-1, x.shape[-1])).reshape(*lead, mod.out_features)
        pads = mod._explicit_padding()
        rev = [v for i in reversed(range(2)) for v in pads[2 * i: 2 * i + 2]]
        x = F.pad(x, rev) if any(rev) else x
        b, _, h, w = x.shape
        k, s, d = mod.kernel_size, mod.stride, mod.dilation
        ho = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
        cols = F.unfold(x, k, dilation=d, stride=s).transpose(1, 2).reshape(-1, mod.shape2d[1])
        y = self._mm(cols).reshape(b, ho * wo, mod.out_channels).transpose(1, 2)
        return y.reshape(b, mod.out_channels, ho, wo)


class OpEntry:
    """The extracted model with the backend's lean inference entry declined (ops.infer_entry finds none):
    each compact layer calls the registered op's implementation through ops.run_unchecked, as before that
    entry existed. The A side of the ``csr_op`` rows (same kernels, same results). A plain callable, not a
    module: the wrapper adds a Python call and two attribute writes, no module machinery."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, x):
        from sparse_engine import ops

        real = ops.infer_entry
        ops.infer_entry = lambda *a, **k: None
        try:
            return self.model(x)
        finally:
            ops.infer_entry = real


def torch_csr_model(extracted: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(extracted)
    for name, mod in list(out.named_modules()):
        if isinstance(mod, (InferLinear, InferConv2d)):
            out.set_submodule(name, TorchCSR(mod))
    return out.eval()


def interleaved(fns: dict, budget_s: float, burst_s: float = 0.01) -> dict[str, tuple[float, float]]:
    """{name: (median, min)} seconds per call. Rounds of one ~10 ms burst per function, interleaved so that
    every provider sees the same machine conditions; at least 5 rounds, more while within budget. median:
    of the burst means; min: the fastest single call."""
    bursts = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        bursts[name] = max(1, min(2000, int(burst_s / max(time.perf_counter() - t0, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    fastest = {name: float("inf") for name in fns}
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            n = bursts[name]
            t_burst = time.perf_counter()
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                fastest[name] = min(fastest[name], time.perf_counter() - t0)
            samples[name].append((time.perf_counter() - t_burst) / n)
        rounds = len(samples[next(iter(fns))])
        if rounds >= 5 and (time.perf_counter() - start > budget_s or rounds >= 500):
            break
    # (median of burst means, fastest single call): the second ignores every call another process interrupted
    return {name: (statistics.median(v), fastest[name]) for name, v in samples.items()}


def machine() -> dict[str, str]:
    return {"machine": f"{cpu_name()} ({torch.get_num_threads()} threads)", "torch": torch.__version__,
            "sparse_engine": sparse_engine.__version__, "commit": git_commit(),
            "compact_backend": backends.which("compact_linear_fwd", "cpu", torch.float32),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def run(models: list[str], densities: list[float], batch_lat: int, batch_thr: int, budget: float) -> list[dict]:
    info = machine()
    print(f"# {info['machine']}, torch {info['torch']}, compact_linear backend: {info['compact_backend']}, "
          f"commit {info['commit']}")
    rows = []
    for name in models:
        make_model, make_x = MODELS[name]
        for density in densities:
            torch.manual_seed(0)
            dense = make_model().eval()
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(dense.state_dict(), os.path.join(tmp, "dense.pt"))
                dense_bytes = os.path.getsize(os.path.join(tmp, "dense.pt"))
                sparse = make_model().eval()
                sparse.load_state_dict(dense.state_dict())
                sparsify(sparse, "static", density, distribution="erk")
                example = make_x(1)
                auto = extract(sparse, "auto", example_inputs=(example,), batch_sizes=(batch_lat, batch_thr))
                # auto told the one batch size it serves: the latency model and the throughput model
                auto_lat = extract(sparse, "auto", example_inputs=(example,), batch_sizes=(batch_lat,))
                auto_thr = extract(sparse, "auto", example_inputs=(example,), batch_sizes=(batch_thr,))
                csr = extract(sparse, "csr")
                tcsr = torch_csr_model(csr)
                file_bytes = io.save(auto, os.path.join(tmp, "m.sparse"))
            def count(model):
                out = {}
                for r in report(model):
                    out[r["format"]] = out.get(r["format"], 0) + 1
                return " ".join(f"{k}:{v}" for k, v in sorted(out.items()))

            formats = {"auto": count(auto), "auto_per_batch": f"b{batch_lat}: {count(auto_lat)}, "
                       f"b{batch_thr}: {count(auto_thr)}"}
            providers = {"dense": dense, "auto": auto, "csr": csr, "csr_op": OpEntry(csr), "torch_csr": tcsr}
            x_lat, x_thr = make_x(batch_lat), make_x(batch_thr)
            stats: dict[str, dict[str, tuple[float, float]]] = {}
            with torch.inference_mode():
                ref = auto(x_thr)
                for pname, model in providers.items():
                    # the dense baseline holds the unpruned weights: only the sparse providers must agree
                    err = 0.0 if pname == "dense" else float((model(x_thr) - ref).abs().max())
                    if err > 1e-3 * float(ref.abs().max()) + 1e-4:
                        raise AssertionError(f"{name} {pname}: output differs from auto by {err}")
                for label, x, per_batch in (("lat", x_lat, auto_lat), ("thr", x_thr, auto_thr)):
                    fns = {p: (lambda m=m, x=x: m(x)) for p, m in providers.items()}
                    fns["auto_per_batch"] = lambda m=per_batch, x=x: m(x)
                    stats[label] = interleaved(fns, budget)
            providers["auto_per_batch"] = auto_thr
            for pname in providers:
                (lat, lat_min), (thr_t, thr_min) = stats["lat"][pname], stats["thr"][pname]
                rows.append({**info, "load_avg": f"{os.getloadavg()[0]:.2f}", "model": name, "density": density,
                             "sparsity": 1 - density, "provider": pname,
                             f"latency_b{batch_lat}_ms": lat * 1e3, f"latency_b{batch_lat}_min_ms": lat_min * 1e3,
                             f"throughput_b{batch_thr}_per_s": batch_thr / thr_t,
                             f"throughput_b{batch_thr}_best_per_s": batch_thr / thr_min,
                             "dense_file_bytes": dense_bytes, "sparse_file_bytes": file_bytes,
                             "file_ratio": file_bytes / dense_bytes,
                             "formats": formats.get(pname, "")})
            print(f"  {name} at {1 - density:.0%} sparse: formats {formats}, file "
                  f"{file_bytes / 1024:.0f} KiB vs dense {dense_bytes / 1024:.0f} KiB", flush=True)
    return rows


def table(rows: list[dict], batch_lat: int, batch_thr: int, stat: str = "median") -> str:
    if stat == "min":
        lat_key, thr_key = f"latency_b{batch_lat}_min_ms", f"throughput_b{batch_thr}_best_per_s"
    else:
        lat_key, thr_key = f"latency_b{batch_lat}_ms", f"throughput_b{batch_thr}_per_s"
    by = {(r["model"], r["density"], r["provider"]): r for r in rows}
    lat_head, thr_head = f"lat b{batch_lat} ms", f"thr b{batch_thr}/s"
    head = (f"{'model':<12} {'sparsity':>8} {'provider':<15} {lat_head:>11} {'vs dense':>8} {'vs t.csr':>8} "
            f"{thr_head:>11} {'vs dense':>8} {'vs t.csr':>8} {'file':>6}")
    lines = [head]
    for (model, density, provider), r in by.items():
        d, t = by[(model, density, "dense")], by[(model, density, "torch_csr")]
        lines.append(
            f"{model:<12} {1 - density:>8.0%} {provider:<15} {r[lat_key]:>11.4f} "
            f"{d[lat_key] / r[lat_key]:>7.2f}x {t[lat_key] / r[lat_key]:>7.2f}x {r[thr_key]:>11.0f} "
            f"{r[thr_key] / d[thr_key]:>7.2f}x {r[thr_key] / t[thr_key]:>7.2f}x "
            + (f"{r['file_ratio']:>6.3f}" if provider == "auto" else f"{'':>6}"))
    lines.append("file: sparse_engine.save of the auto model / torch.save(dense state_dict)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- GPU: 2:4

# Projection shapes of a 7B Llama (q/o: 4096x4096, up/gate: 11008x4096, down: 4096x11008).
GPU_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
GPU_ROWS = [1, 16, 64, 512, 4096]


def cuda_time(fn, budget_s: float) -> float:
    """Median seconds per call on the GPU: CUDA-event timed bursts after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(1, min(200, int(0.005 / max(time.perf_counter() - t0, 1e-6))))
    out = []
    start = time.perf_counter()
    while len(out) < 5 or (time.perf_counter() - start < budget_s and len(out) < 100):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / n)
    return statistics.median(out)


def run_gpu(budget: float) -> list[dict]:
    """2:4 semi-structured InferLinear against dense F.linear on the GPU, per layer and for a model."""
    from sparse_engine.export.infer import semi_structured_support
    from sparse_engine.masks import nm_mask
    from sparse_engine.nn import SparseLinear

    info = machine()
    info["machine"] = torch.cuda.get_device_name()
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for n, k in GPU_SHAPES:
            why = semi_structured_support("cuda", dtype, (n, k))
            if why:
                print(f"  skip {n}x{k} {dtype}: {why}")
                continue
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            mask = nm_mask(w, 2, 4)
            dense = InferLinear(w, None, "dense", mask)
            nm = InferLinear(w, None, "nm", mask)
            for b in GPU_ROWS:
                x = torch.randn(b, k, device="cuda", dtype=dtype)
                with torch.inference_mode():
                    err = float((nm(x) - dense(x)).abs().max() / dense(x).abs().max())
                    t_d = cuda_time(lambda x=x, m=dense: m(x), budget)
                    t_n = cuda_time(lambda x=x, m=nm: m(x), budget)
                rows.append({**info, "what": "layer", "shape": f"{n}x{k}", "dtype": str(dtype), "rows": b,
                             "dense_ms": t_d * 1e3, "nm_ms": t_n * 1e3, "speedup": t_d / t_n, "rel_err": err})
                print(f"  {n}x{k} {dtype!s:<15} rows {b:>5}: dense {t_d * 1e3:.4f} ms, 2:4 {t_n * 1e3:.4f} ms, "
                      f"{t_d / t_n:.2f}x (rel err {err:.1e})", flush=True)
    # a model: 2 encoder blocks with d=2048 (fp16), every Linear 2:4 by magnitude; extract "auto" on this GPU
    torch.manual_seed(0)
    model = TinyTransformer(32000, 256, 10, d=2048, heads=16, layers=2).cuda().half().eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and mod.in_features % 4 == 0 and mod.out_features >= 32:
            model.set_submodule(name, SparseLinear.from_dense(mod, mask=nm_mask(mod.weight, 2, 4)))
    x = torch.randint(0, 32000, (8, 256), device="cuda")
    with torch.inference_mode():
        auto = extract(model, "auto", example_inputs=(x,), batch_sizes=(1, 8))
        dense_eq = reformat(auto, "dense")
        formats = {}
        for r in report(auto):
            formats[r["format"]] = formats.get(r["format"], 0) + 1
        err = float((auto(x) - dense_eq(x)).abs().max())
        for b in (1, 8):
            xb = x[:b]
            t_d = cuda_time(lambda xb=xb: dense_eq(xb), budget)
            t_a = cuda_time(lambda xb=xb: auto(xb), budget)
            rows.append({**info, "what": f"transformer d2048 auto {formats}", "shape": "", "dtype": "torch.float16",
                         "rows": b * 256, "dense_ms": t_d * 1e3, "nm_ms": t_a * 1e3, "speedup": t_d / t_a,
                         "rel_err": err})
            print(f"  transformer d=2048 (auto formats {formats}), batch {b}x256 tokens: dense {t_d * 1e3:.3f} ms, "
                  f"extracted {t_a * 1e3:.3f} ms, {t_d / t_a:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--densities", default="0.2,0.1,0.05")
    ap.add_argument("--batch-latency", type=int, default=1)
    ap.add_argument("--batch-throughput", type=int, default=64)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    ap.add_argument("--quick", action="store_true", help="short timings (smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the printed table (the CSV holds both): median of the interleaved rounds, "
                    "or the fastest single call (robust when other processes share the CPU)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the 2:4 semi-structured path against dense on the GPU (bench_extract_gpu.csv)")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA GPU")
        rows = run_gpu(0.2 if args.quick else args.budget)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_extract_gpu.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return 0
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; known {sorted(MODELS)}")
    densities = [float(d) for d in args.densities.split(",")]
    budget = 0.1 if args.quick else args.budget
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(models, densities, args.batch_latency, args.batch_throughput, budget)
    text = table(rows, args.batch_latency, args.batch_throughput, args.stat)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_extract.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "bench_extract.txt"), "w") as f:
        f.write(f"# {rows[0]['machine']}, torch {rows[0]['torch']}, compact_linear backend "
                f"{rows[0]['compact_backend']}, commit {rows[0]['commit']}, {rows[0]['date']}, "
                f"load average {rows[0]['load_avg']}, table statistic: {args.stat}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sparse-engine export`` and ``sparse-engine bench-infer``.

``export RUN --format auto --out model.sparse``
    RUN is a ``sparse-engine train`` run directory (or its ``checkpoint.pt``, the training state, loaded
    with ``weights_only=True``): the model is rebuilt from the checkpoint's configuration, its weights
    loaded, and extracted once in ``--format`` (``auto``: measured on this machine at ``--batch-size``, the
    batch the model will run at, or at each of ``--batch`` sizes; each layer's line says what was measured)
    into a compact file recording the input shape in its metadata for ``bench-infer``. A run that has not
    finished exports its last finished epoch. A dense run (``dense``, ``wd_switchoff``) is exported as
    dense inference layers (``--format dense`` or ``auto``; a sparse format is refused, since every weight
    is nonzero). A file written by export is accepted too and re-laid in ``--format``.

``bench-infer MODEL.sparse --batch 1,16,64``
    Latency (median ms per call) and throughput (samples/s) of the file's model against its dense
    equivalent (the same θ as dense weights) at each batch size, under ``torch.inference_mode()``. The two
    are timed in interleaved rounds (load from other processes hits both alike); the speed-up is the
    median of the per-round ratios, and a spread of those ratios wider than ±10 % is printed as a warning.

Each function takes argv (without the subcommand name) and returns an exit code; user errors raise
``sparse_engine.app.cli.UserError`` (one line, exit code 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any

import torch
from torch import nn

from .cli import Parser

PROG = "sparse-engine"


def _user_error(msg: str) -> Exception:
    try:
        from .cli import UserError
    except ImportError:  # cli not installed: still a clean message
        return SystemExit(f"{PROG}: error: {msg}")
    return UserError(msg)


def _batches(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise _user_error(f"--batch must be comma-separated positive ints, got {text!r}") from None
    if not out or any(b <= 0 for b in out):
        raise _user_error(f"--batch must be comma-separated positive ints, got {text!r}")
    return out


# ---------------------------------------------------------------------------------- reading inputs


def _resolve(path: str) -> str:
    """The file of ``path``: the file itself, or a run directory's checkpoint.pt (else its model.sparse)."""
    from .checkpoint import CHECKPOINT_FILE

    if os.path.isdir(path):
        for name in (CHECKPOINT_FILE, "model.sparse"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise _user_error(f"{path} is a directory without {CHECKPOINT_FILE} or model.sparse (is it a `sparse-engine "
                          "train` run directory? a --compare run has one per method: <dir>/<method>)")
    if not os.path.isfile(path):
        raise _user_error(f"{path} does not exist")
    return path


def _read_file(path: str) -> tuple[nn.Module, dict]:
    """(model, header) of a sparse_engine file; the example models are registered first, so that a file
    of one of them loads without being given an instance."""
    from ..export import io
    from . import models  # noqa: F401  (importing registers MLP, SmallResNet, TinyTransformer with io)

    try:
        return io.load(path), io.read_header(path)
    except io.SparseFileError as e:
        raise _user_error(str(e)) from None


def _load(path: str) -> tuple[nn.Module, dict[str, Any], str | None]:
    """(model, input description, the training method if the run trained a dense model, else None).

    A sparse_engine file gives its inference model; a training checkpoint gives the trained model (its
    sparse layers, not extracted yet), or for a dense run its layers as dense inference layers."""
    from ..export import extract_dense, io
    from . import checkpoint as ck

    path = _resolve(path)
    with open(path, "rb") as f:
        magic = f.read(len(io.MAGIC))
    if magic == io.MAGIC:
        model, header = _read_file(path)
        return model, _input_from_metadata(header.get("metadata", {})), None
    try:
        ckpt_path, ckpt = ck.read_checkpoint(path)
        ckpt["path"] = str(ckpt_path)
        model, method, cfg = ck.model_from_checkpoint(ckpt)
    except ck.CheckpointError as e:
        raise _user_error(f"{path} is neither a sparse_engine file nor a usable training checkpoint: {e}") from None
    saved = ckpt["config"]
    info = {"input_shape": list(saved["input_shape"]), "input_dtype": "int64" if saved.get("vocab_size") else
            "float32", "vocab_size": saved.get("vocab_size")}
    if method.sparsify_as is None:  # dense and wd_switchoff leave the model dense: nothing was pruned
        return extract_dense(model), info, cfg.method
    return model, info, None


def _input_from_metadata(meta: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("input_shape", "input_dtype", "vocab_size"):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except (TypeError, ValueError):
                pass
    return out


def guess_input(model: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """Fill the input description from the model when the file did not record it."""
    from ..export import InferModule
    from . import models

    if info.get("input_shape"):
        return info
    out = dict(info)
    if isinstance(model, getattr(models, "TinyTransformer", ())):
        out.update(input_shape=[int(model.pos.shape[0])], input_dtype="int64",
                   vocab_size=int(model.embed.num_embeddings))
    elif isinstance(model, getattr(models, "SmallResNet", ())):
        out.update(input_shape=[int(model.in_channels), int(model.image_size), int(model.image_size)],
                   input_dtype="float32")
    else:
        first = next((m for m in model.modules() if isinstance(m, (InferModule, nn.Linear, nn.Conv2d))), None)
        if first is not None and hasattr(first, "in_features"):
            out.update(input_shape=[int(first.in_features)], input_dtype="float32")
    return out


def make_input(info: dict[str, Any], batch: int, dtype: torch.dtype) -> torch.Tensor:
    shape = (batch, *info["input_shape"])
    if info.get("input_dtype") == "int64":
        return torch.randint(0, int(info.get("vocab_size") or 2), shape)
    return torch.randn(shape, dtype=dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ------------------------------------------------------------------------------------------- export


def _export_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} export", description="Extract a trained sparse model into a "
                                "compact file (values + indices; no pickle).")
    p.add_argument("checkpoint", help="a `sparse-engine train` run directory, its checkpoint.pt, or a file "
                   "written by export (to re-lay it)")
    p.add_argument("--format", default="auto", choices=("auto", "dense", "csr", "bsr", "nm"),
                   help="per-layer format; auto = fastest measured on this machine")
    p.add_argument("--out", default=None, help="output file (default: <checkpoint dir>/model.sparse)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="the batch size the model will run at: auto measures there (default: 1)")
    p.add_argument("--batch", default=None, help="instead of --batch-size, comma-separated batch sizes: auto "
                   "then keeps a sparse format only where it wins at every one (default: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def export_main(argv: list[str]) -> int:
    from ..export import extract, io, reformat, report, sparse_layers

    args = _export_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch is not None and args.batch_size is not None:
        raise _user_error("give --batch-size or --batch, not both")
    if args.batch_size is not None and args.batch_size <= 0:
        raise _user_error(f"--batch-size must be a positive int, got {args.batch_size}")
    batches = _batches(args.batch) if args.batch is not None else (args.batch_size or 1,)
    model, info, dense_method = _load(args.checkpoint)
    info = guess_input(model, info)
    if dense_method is not None:
        # A dense run has no pruned weight: a sparse format would store every weight plus its index.
        if args.format not in ("auto", "dense"):
            raise _user_error(f"{args.checkpoint} is a dense model (trained with method {dense_method!r}, every "
                              f"weight nonzero): --format {args.format} would only make it larger and slower; "
                              "export it with --format dense (or auto)")
        out = model
    else:
        example = None
        if info.get("input_shape"):
            example = (make_input(info, 1, _model_dtype(model)),)
        relay = extract if sparse_layers(model) else reformat  # a trained model is extracted once
        try:
            out = relay(model, args.format, example_inputs=example, batch_sizes=batches, inplace=True)
        except ValueError as e:
            raise _user_error(str(e)) from None
    path = args.out or os.path.join(os.path.dirname(_resolve(args.checkpoint)), "model.sparse")
    meta = {k: json.dumps(v) for k, v in info.items() if v is not None}
    size = io.save(out, path, metadata=meta)
    if args.format == "auto" and dense_method is None:
        print(f"auto: measured on this machine ({torch.get_num_threads()} threads) at batch "
              f"{', '.join(map(str, batches))}; a sparse format only where it is faster than dense beyond the "
              "noise of the machine")
    rows = report(out)
    width = max(len(r["name"]) for r in rows)
    print(f"{'layer':<{width}}  {'shape':<16} {'density':>8}  format  reason")
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<{width}}  {shape:<16} {r['density']:>8.4f}  {r['format']:<6}  {r['reason']}")
    print(f"wrote {path}: {size:,} bytes")
    return 0


# -------------------------------------------------------------------------------------- bench-infer


def _bench_parser() -> argparse.ArgumentParser:
    p = Parser(prog=f"{PROG} bench-infer", description="Inference latency and throughput of "
                                "an exported model against its dense equivalent.")
    p.add_argument("model", help="a file written by `sparse-engine export`")
    p.add_argument("--batch", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--input-shape", default=None, help="shape of one sample, e.g. 784 or 1,28,28 "
                   "(default: from the file)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    return p


def time_pair(fns: dict[str, Any], budget_s: float) -> dict[str, list[float]]:
    """Per-round seconds per call of each function, timed in interleaved rounds of ~10 ms bursts for about
    ``budget_s`` seconds each (at least 3 rounds): the i-th rounds ran under about the same load."""
    from .. import tuning

    return tuning.measure_rounds(fns, warmup=3, rounds=200, budget_s=budget_s * len(fns), burst_s=0.01)


def _bench_row(batch: int, samples: dict[str, list[float]]) -> dict[str, Any]:
    t_sparse, t_dense = statistics.median(samples["sparse"]), statistics.median(samples["dense"])
    ratios = sorted(d / s for d, s in zip(samples["dense"], samples["sparse"]))
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    speedup = statistics.median(ratios)
    return {"batch": batch, "sparse_ms": t_sparse * 1e3, "dense_ms": t_dense * 1e3, "sparse_per_s": batch / t_sparse,
            "dense_per_s": batch / t_dense, "speedup": speedup, "speedup_q1": q1, "speedup_q3": q3,
            "rounds": len(ratios)}


def bench_infer_main(argv: list[str]) -> int:
    from ..export import reformat

    args = _bench_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batches = _batches(args.batch)
    if not os.path.isfile(args.model):
        raise _user_error(f"{args.model} does not exist")
    model, header = _read_file(args.model)
    info = _input_from_metadata(header.get("metadata", {}))
    if args.input_shape:
        try:
            info["input_shape"] = [int(d) for d in args.input_shape.split(",")]
        except ValueError:
            raise _user_error(f"--input-shape must be comma-separated ints, got {args.input_shape!r}") from None
    info = guess_input(model, info)
    if not info.get("input_shape"):
        raise _user_error("the file does not record the input shape; give --input-shape")
    dense = reformat(model, "dense")
    dtype = _model_dtype(model)
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = make_input(info, b, dtype)
            try:
                model(x)
            except (RuntimeError, ValueError) as e:
                raise _user_error(f"the model does not accept inputs of shape {tuple(x.shape)} ({e}); "
                                  "give --input-shape") from None
            rows.append(_bench_row(b, time_pair({"sparse": lambda x=x: model(x), "dense": lambda x=x: dense(x)},
                                                args.budget)))
    formats: dict[str, int] = {}
    for m in model.modules():
        if hasattr(m, "format") and hasattr(m, "weight_shape"):
            formats[m.format] = formats.get(m.format, 0) + 1
    if args.json:
        print(json.dumps({"file": args.model, "formats": formats, "threads": torch.get_num_threads(),
                          "rows": rows}, indent=1))
        return 0
    print(f"{args.model}: {sum(formats.values())} sparse layers ({', '.join(f'{v} {k}' for k, v in formats.items())}),"
          f" input {tuple(info['input_shape'])}, {torch.get_num_threads()} threads")
    print(f"{'batch':>6} {'latency ms':>11} {'dense ms':>9} {'samples/s':>11} {'dense /s':>11} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['sparse_ms']:>11.4f} {r['dense_ms']:>9.4f} {r['sparse_per_s']:>11,.0f} "
              f"{r['dense_per_s']:>11,.0f} {r['speedup']:>7.2f}x")
    noisy = [r for r in rows if r["speedup_q3"] > 1.1 * r["speedup"] or r["speedup_q1"] < r["speedup"] / 1.1]
    for r in noisy:
        print(f"warning: batch {r['batch']}: the per-round speed-ups spread from {r['speedup_q1']:.2f}x to "
              f"{r['speedup_q3']:.2f}x (quartiles of {r['rounds']} rounds): this machine is busy; the median is "
              "shown, use --threads 1 or a longer --budget on a quieter machine")
    if any(not math.isfinite(r["speedup"]) for r in rows):
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sparse_engine.app.extract_cli export|bench-infer ...`` (the same as the sparse-engine ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"export": export_main, "bench-infer": bench_infer_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m sparse_engine.app.extract_cli {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except Exception as e:
        if type(e).__name__ == "UserError":
            print(f"{PROG} {argv[0]}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

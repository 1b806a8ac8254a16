"""``sparse-engine``: the command-line entry point.

Subcommands live in :data:`COMMANDS`, one entry each: the name, a one-line help and a lazy target
``"module:function"``; the function takes the remaining argv and returns an exit code. Nothing is
imported until a subcommand runs, and a subcommand whose module is not installed is left out of the
listing (and says so when called). To add one, add a line to ``COMMANDS``.

User errors (bad option, missing or corrupt data, a diverging run) print one line,
``sparse-engine <cmd>: error: ...``, and exit non-zero; a traceback means a bug. A subcommand signals a
user error by raising :class:`UserError`, ``config.ConfigError`` or ``data.DataError``.
Exit codes: 0 done, 2 usage / input error, 3 training diverged, 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

PROG = "sparse-engine"


class UserError(Exception):
    """An error in what the user asked for: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Command:
    help: str
    target: str  # "module:function", function(argv: list[str]) -> int

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def available(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def load(self) -> Callable[[list[str]], int]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)


#: name -> Command. A command whose module is missing (e.g. bench before it exists) is not listed.
COMMANDS: dict[str, Command] = {
    "train": Command("train a model with a sparse method, or --compare several", "sparse_engine.app.cli:train_main"),
    "info": Command("versions, backends and their availability, environment variables", "sparse_engine.app.info:main"),
    "bench": Command("run the benchmark suite (bench/): ops, layers, crossover, train-step breakdown",
                     "sparse_engine.app.bench_cli:main"),
    "export": Command("re-lay a trained model (a train run directory) into a compact inference file",
                      "sparse_engine.app.extract_cli:export_main"),
    "bench-infer": Command("latency and throughput of an exported model against its dense equivalent",
                           "sparse_engine.app.extract_cli:bench_infer_main"),
}


def _usage() -> str:
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)", "", "commands:"]
    for name, cmd in COMMANDS.items():
        if cmd.available():
            lines.append(f"  {name:<12} {cmd.help}")
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .data import DataError

    return (UserError, ConfigError, DataError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from .. import __version__

        print(f"{PROG} {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS.get(name)
    if cmd is None or not cmd.available():
        known = ", ".join(n for n, c in COMMANDS.items() if c.available())
        why = "unknown command" if cmd is None else "command not available in this installation"
        print(f"{PROG}: error: {why} {name!r} (choose from {known})", file=sys.stderr)
        return 2
    try:
        return int(cmd.load()(rest) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error it has already printed (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"\n{PROG} {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .loop import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"{PROG} {name}: error: {e}", file=sys.stderr)
            return 3
        if isinstance(e, _user_errors()):
            print(f"{PROG} {name}: error: {e}", file=sys.stderr)
            return 2
        raise


# ------------------------------------------------------------------------------------------------ train


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) with a pointer to --help, not the
    whole usage first: the train command's usage alone is 26 lines, which hid the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default: None (an option unset) is left to the help text, which says what applies."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        if not action.help:
            return "(default: %(default)s)"
        return super()._get_help_string(action)


def _train_parser() -> argparse.ArgumentParser:
    from ..methods import METHODS
    from ..optim import NONFINITE_POLICIES
    from .config import DATASETS, LR_SCHEDULES, OPTIMIZERS, TrainConfig
    from .models import MODELS

    d = TrainConfig()
    p = Parser(
        prog=f"{PROG} train",
        description="Train a model with a sparse-training method; prints a table and writes JSON under --out.",
        formatter_class=_Formatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument("--model", choices=MODELS, default=d.model, help="the network")
    what.add_argument("--method", choices=tuple(METHODS), default=d.method, help="the sparse-training method")
    what.add_argument("--compare", metavar="M1,M2,...", default=None,
                      help="run several methods on the same seed and data and print them side by side "
                           "(default: none, one run of --method)")
    _method_arguments(what, p.add_argument_group("method options (default: the method's own)"))
    what.add_argument("--data", choices=DATASETS, default=d.data,
                      help="auto: Fashion-MNIST (token sequences for the transformer)")
    what.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files (default: "
                      "$SPARSE_ENGINE_DATA, else the Debian package's folder, else the cache)")
    what.add_argument("--n-train", type=int, default=None,
                      help="use only the first N training samples (default: all)")
    what.add_argument("--n-test", type=int, default=None, help="use only the first N test samples (default: all)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer, help="the fused optimizer")
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (sgd only)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay λ")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule, help="per-step learning rate")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the model, masks and data order")
    g.add_argument("--device", default=d.device, help="torch device (cpu, cuda)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for the mlp, whose matmuls are too small to share; "
                        "torch's choice otherwise)")
    g.add_argument("--step-in-backward", action="store_true",
                   help="update each tensor inside backward and free its gradient at once")
    g.add_argument("--channels-last", action="store_true",
                   help="train the model and its image batches in torch.channels_last memory format (the cnn: "
                        "its batch norms and convolutions, dense and csr, run NHWC, faster on CPU)")
    g.add_argument("--nonfinite", choices=NONFINITE_POLICIES, default=d.nonfinite,
                   help="what a NaN/inf gradient does: skip the step (counted) or stop")
    g.add_argument("--nproc", type=int, default=1,
                   help="train on N processes with DistributedDataParallel (gloo on CPU, NCCL on CUDA): each "
                        "global batch is split over them, every printed number is global; under torchrun its "
                        "processes are used instead")
    g.add_argument("--fsdp", action="store_true",
                   help="with --nproc N (or torchrun): shard the model with FSDP2 (fully_shard) instead of DDP, "
                        "each process holding a part of every parameter and of the optimizer state; the "
                        "checkpoint keeps the whole model (for export) and the sharded state in a folder "
                        "beside it")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default runs/<model>-<method>-d<density>-s<seed>)")
    g.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    g.add_argument("--resume", metavar="PATH", default=None,
                   help="continue an interrupted run from its checkpoint (a run directory, its checkpoint.pt, or "
                        "a --compare run directory); the configuration comes from the checkpoint, and options "
                        "given with it must agree (--out, --threads, --data-dir, --step-in-backward and "
                        "--no-progress may change) (default: none, a new run)")
    return p


def _method_arguments(common: argparse._ArgumentGroup, own: argparse._ArgumentGroup) -> None:
    """One option per method option (sparse_engine.methods.options(): declared in the method configs);
    the common ones (every method has them) with their default, the others with None: the method's own."""
    from ..methods import options

    for opt in options().values():
        flag = "--" + opt.name.replace("_", "-")
        if opt.common:
            common.add_argument(flag, type=opt.type, choices=opt.choices, default=opt.default, help=opt.help)
            continue
        text = f"{opt.help} (default: {', '.join(f'{m} {v}' for m, v in opt.defaults.items())})"
        if opt.type is bool:
            own.add_argument(flag, action="store_true", default=None, help=text)
        else:
            own.add_argument(flag, type=opt.type, choices=opt.choices, default=None, help=text)


def _config_from_args(args: argparse.Namespace):
    from .config import TrainConfig

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**given, progress=not args.no_progress)


def _given(argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line (not left at their defaults)."""
    p = _train_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _methods(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def train_main(argv: list[str]) -> int:
    from . import compare as C
    from . import config as T
    from .loop import train

    args = _train_parser().parse_args(argv)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _check_multiprocess(args, launch=True)
        if args.resume is not None:  # the checkpoint and the options agree, before any process starts
            _resume(args, _given(argv), processes=args.nproc)
        return _launch(argv, args.nproc)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _rank_main(args, argv)
    if args.fsdp and args.resume is None:
        raise UserError("--fsdp: shards the model over several processes: add --nproc N (N >= 2) or run "
                        "under torchrun")
    if args.resume is not None:
        return _resume(args, _given(argv))
    cfg = _config_from_args(args)
    if args.compare is not None:
        methods = _methods(args.compare)
        cfg.out_dir = args.out or T.default_out_dir(cfg, methods)
        _run(lambda: C.compare(cfg, methods), cfg.out_dir)
        print(f"results: {cfg.out_dir}/compare.json (per method: {cfg.out_dir}/<method>/result.json)")
        return 0
    cfg.out_dir = args.out or T.default_out_dir(cfg)
    result = _run(lambda: train(cfg), cfg.out_dir)
    print(C.summary_table({cfg.method: result}))
    print(f"results: {cfg.out_dir}/result.json")
    return 0


def _check_multiprocess(args: argparse.Namespace, launch: bool = False) -> None:
    """What a run on several processes does not do (yet): one line before any process starts."""
    if args.compare is not None:
        raise UserError("--compare: runs in one process only (for now): drop --nproc / torchrun")
    if args.layout == "auto":  # each rank would measure, and may choose, its own layouts
        raise UserError("--layout auto: not on several processes (for now): choose dense, csr, ... explicitly")
    if launch and args.resume is None:
        _config_from_args(args).validate()  # e.g. --fsdp with a method that cannot train shards


#: a launched process runs the command line (imported, not ``-m``: its errors are this module's classes)
_CHILD = "import sys; from sparse_engine.app.cli import main; sys.exit(main())"


def _launch(argv: list[str], nproc: int) -> int:
    """Start ``nproc`` processes of this command (the environment torchrun would give them), wait for all;
    the first failure stops the others (after a user error they first get a few seconds to end). Rank 0
    speaks on this terminal; what the other ranks write to stderr is shown after they end, unless rank 0
    stopped on a user error (exit code 2): every rank then stopped on the same one-line error (a method
    refusing sharded parameters, ...), said once."""
    import socket
    import subprocess
    import tempfile
    import time

    with socket.socket() as sock:  # a free port on the loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs, errs = [], [tempfile.TemporaryFile(mode="w+") for _ in range(nproc - 1)]
    for rank in range(nproc):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                   RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, "train", *argv], env=env,
                                      stderr=errs[rank - 1] if rank else None))
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            break
        time.sleep(0.2)
    if 2 in failed:
        # A user error, which every rank meets and says: let the others end by themselves (a few seconds
        # at most). Killed at once, rank 0 could die after writing its line, and its exit code would no
        # longer tell that the others' lines repeat it (seen: the same line printed twice).
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    for err in errs:
        err.seek(0)
        text = err.read()
        err.close()
        if text and procs[0].returncode != 2:
            sys.stderr.write(text)
    # the exit code of the rank that failed first (not the -9 of the ranks killed after it)
    return abs(failed[0]) if failed else 0


def _rank_main(args: argparse.Namespace, argv: list[str]) -> int:
    """One process of a multi-process run: join the group, train or resume (rank 0 alone writes and prints;
    under FSDP2 every rank takes part in writing the checkpoint)."""
    from datetime import timedelta

    import torch.distributed as dist

    from . import compare as C
    from . import config as T
    from .loop import train

    _check_multiprocess(args)
    cuda = str(args.device).startswith("cuda")
    rank = int(os.environ["RANK"])
    if cuda:
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    try:
        if args.resume is not None:
            _resume(args, _given(argv), rank)
        else:
            cfg = _config_from_args(args)
            cfg.progress = cfg.progress and rank == 0
            cfg.out_dir = args.out or T.default_out_dir(cfg)
            result = _run(lambda: train(cfg), cfg.out_dir)
            if rank == 0:
                print(C.summary_table({cfg.method: result}))
                print(f"results: {cfg.out_dir}/result.json ({dist.get_world_size()} processes)")
        _quiesce()
    finally:
        dist.destroy_process_group()
    return 0


def _quiesce() -> None:
    """Before a successful run's group is destroyed: free what only the cycle collector would free (it
    may still hold the group, as a DDP model does) and let every rank arrive, so that no rank closes its
    connections while another still uses them. Without this, 1 of 105 two-process gloo runs (CPU)
    aborted after its last line with "terminate called without an active exception" (0 of 60 with it:
    fewer than needed to call the cause proven). Not on a failure path: a barrier there would wait for a
    rank that has stopped."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()


def _run(job: Callable[[], Any], out_dir: str) -> Any:
    """Run ``job``; on Ctrl-C, say how to continue (train writes a checkpoint after every epoch)."""
    from pathlib import Path

    from .checkpoint import CHECKPOINT_FILE

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return job()
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") != "0":  # rank 0 says it, once
            raise SystemExit(130) from None
        how = ""
        if any(Path(out_dir).glob(f"**/{CHECKPOINT_FILE}")):
            nproc = f" --nproc {world}" if world > 1 else ""
            how = f"; continue from the last finished epoch with: {PROG} train --resume {out_dir}{nproc}"
        print(f"\n{PROG} train: interrupted{how}", file=sys.stderr)
        raise SystemExit(130) from None


def _resume(args: argparse.Namespace, given: set[str], rank: int = 0, processes: int | None = None) -> int:
    """``train --resume PATH``: the configuration comes from the checkpoint (or a compare's plan); options
    on the command line must agree with it, except those of ``checkpoint.RESUME_MAY_CHANGE`` (how the run
    executes, not what it computes) and --out. ``rank``: this process's in a multi-process run (rank 0
    alone prints); ``processes``: only check, before launching that many (the run's number, or an error)."""
    from pathlib import Path

    from . import checkpoint as T
    from . import compare as C
    from .distributed_run import check_world
    from .loop import train

    path = Path(args.resume)
    compare = path.is_dir() and (path / T.COMPARE_PLAN).is_file() and not (path / T.CHECKPOINT_FILE).is_file()
    if compare:
        plan = C.read_compare_plan(path)
        saved, methods = plan["config"], list(plan["methods"])
        if "compare" in given and _methods(args.compare) != methods:
            raise UserError(f"cannot resume {path}: --compare is {args.compare} here but {','.join(methods)} "
                            "in the run")
        if "out" in given and Path(args.out).resolve() != path.resolve():
            raise UserError(f"--out: a resumed --compare run continues in its own directory ({path}); "
                            "drop --out")
    else:
        ckpt_path, ckpt = T.read_checkpoint(path)
        saved = ckpt["config"]
        if "compare" in given:
            raise UserError(f"--compare: {ckpt_path} is the checkpoint of one run (method {saved.get('method')!r}); "
                            "to resume a compare, give its directory")
    cfg = T.config_from_checkpoint(saved)
    explicit = _config_from_args(args)
    for dest in given - {"compare", "resume", "out", "no_progress", "nproc"}:
        setattr(cfg, dest, getattr(explicit, dest))
    cfg.progress = not args.no_progress and rank == 0
    cfg.validate()
    T.check_resume_config(cfg, saved, path, option=lambda name: "--" + name.replace("_", "-"))
    if compare and processes is not None:
        raise UserError(f"--resume: {path} is a --compare run, which runs in one process only: drop --nproc")
    if compare:
        cfg.out_dir = str(path)
        _run(lambda: C.compare(cfg, methods, resume=True), cfg.out_dir)
        print(f"results: {cfg.out_dir}/compare.json (per method: {cfg.out_dir}/<method>/result.json)")
        return 0
    check_world(ckpt, ckpt_path, processes)
    if processes is not None:
        return 0
    cfg.out_dir = args.out or str(ckpt_path.parent)
    if ckpt.get("position", {}).get("finished") and rank == 0:
        print(f"{ckpt_path}: this run had finished (epochs: {len(ckpt.get('result', {}).get('epochs', []))}); "
              "nothing left to train: its result")
    result = _run(lambda: train(cfg, resume=ckpt_path), cfg.out_dir)
    if rank == 0:
        print(C.summary_table({cfg.method: result}))
        print(f"results: {cfg.out_dir}/result.json")
    return 0


if __name__ == "__main__":  # python -m sparse_engine.app.cli
    sys.exit(main())

"""``sparse-engine info`` (also ``python -m sparse_engine.app.info``): what this installation can run.

Prints the versions (sparse_engine, torch, triton, numpy, Python, CUDA), the environment variables of
:mod:`sparse_engine.env` with their current values, and a table of every implementation × backend:
``yes`` or ``no`` with a numbered note giving the reason (or the dtypes a backend limits itself to),
plus the backend that the automatic choice takes for float32 on each visible device type. ``--json``
prints the same as one JSON object. Importing this module does nothing; :func:`collect` does the work.
"""
from __future__ import annotations

import json
import platform
import sys
import warnings
from typing import Sequence

import torch

from .. import __version__, env
from ..ops import backends


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as e:  # noqa: BLE001 - a broken optional install must not break `info`
        return f"not available ({type(e).__name__}: {e})"
    return str(getattr(mod, "__version__", "unknown"))


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def collect() -> dict:
    """Everything ``info`` prints, as plain data."""
    cuda = torch.cuda.is_available()
    versions = {
        "sparse_engine": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch CUDA build": str(torch.version.cuda),
        "CUDA available": str(cuda),
    }
    if cuda:
        versions["GPU"] = torch.cuda.get_device_name(0)
    variables = {name: {"value": env.get(name), "meaning": meaning}
                 for name, meaning in env.VARIABLES.items()}

    devices = ["cpu"] + (["cuda"] if cuda else [])
    with warnings.catch_warnings():  # a backend that warns on load: its reason is in the table anyway
        warnings.simplefilter("ignore")
        table: dict[str, dict] = backends.availability()
    for impl, row in table.items():
        for cell in row.values():
            cell["dtypes"] = None if cell["dtypes"] is None else _dtype_names(cell["dtypes"])
        row["auto"] = {dev: backends.automatic(impl, dev, torch.float32) for dev in devices}
    try:
        requested = backends.requested()
        request_note = f"SPARSE_ENGINE_BACKEND requests {requested!r}" if requested else "automatic choice"
    except ValueError as e:
        request_note = f"invalid: {e}"
    return {"versions": versions, "environment": variables, "backend_request": request_note,
            "implementations": table, "devices": devices}


def format_text(data: dict) -> str:
    lines = ["sparse_engine info", "", "versions"]
    width = max(len(k) for k in data["versions"])
    lines += [f"  {k:<{width}}  {v}" for k, v in data["versions"].items()]
    lines += ["", "environment variables"]
    width = max(len(k) for k in data["environment"])
    for name, item in data["environment"].items():
        value = "(unset)" if item["value"] is None else repr(item["value"])
        lines.append(f"  {name:<{width}}  {value:<10}  {item['meaning']}")
    lines += ["", f"backends ({data['backend_request']})"]

    notes: dict[str, int] = {}

    def note(text: str) -> str:
        return f"[{notes.setdefault(text, len(notes) + 1)}]"

    header = ["implementation", *backends.BACKENDS, *(f"auto({d}, float32)" for d in data["devices"])]
    rows = []
    for impl, row in data["implementations"].items():
        cells = [impl]
        for backend in backends.BACKENDS:
            cell = row[backend]
            if cell["available"]:
                dtypes = cell.get("dtypes")
                cells.append("yes" if dtypes is None else "yes" + note(f"{backend}: dtypes {dtypes}"))
            else:
                cells.append("no" + note(f"{backend}: {cell['reason']}"))
        cells += [row["auto"][d] for d in data["devices"]]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if notes:
        lines += ["", "notes"]
        lines += [f"  [{i}] {text}" for text, i in notes.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import Parser

    parser = Parser(prog="sparse-engine info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    data = collect()
    print(json.dumps(data, indent=1) if args.json else format_text(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

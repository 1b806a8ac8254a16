"""gmp (gradual magnitude pruning, cubic schedule) and acdc (alternating dense / sparse phases)."""

import math

import pytest
import torch
from torch import nn

from sparse_engine.methods import make_method
from sparse_engine.methods.acdc import acdc_sparse
from sparse_engine.methods.gmp import cubic_density
from sparse_engine.param import sparse_layers


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5)).double()


def _data(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g))
            for _ in range(steps)]


def _run(method, model, steps, on_step=None):
    method.prepare(model)
    opt = method.make_optimizer(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
    method.apply(model, opt, epochs=1, steps_per_epoch=steps)
    for i, (x, y) in enumerate(_data(steps), start=1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if on_step is not None:
            on_step(i, model, opt)
    return opt


def _nnz(model):
    return sum(m.nnz() for _, m in sparse_layers(model))


def _pruned_are_zero(model, opt):
    for _, layer in sparse_layers(model):
        pz = layer.param
        if pz.mask is None:
            continue
        off = ~pz.mask
        assert bool((pz.w[off] == 0).all())
        if pz.m is not None:
            assert torch.allclose(pz.m[off], torch.full_like(pz.m[off], math.sqrt(float(pz.beta))))
        for _, p, _ in pz.step_targets():
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                assert bool((buf[off] == 0).all())


def test_cubic_density_by_hand():
    assert cubic_density(0, 0.1, 0, 100) == 1.0
    assert cubic_density(50, 0.1, 0, 100) == pytest.approx(0.1 + 0.9 * 0.125)
    assert cubic_density(100, 0.1, 0, 100) == pytest.approx(0.1)
    assert cubic_density(150, 0.1, 0, 100) == pytest.approx(0.1)
    assert cubic_density(10, 0.2, 20, 60) == 1.0


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gmp_follows_the_cubic_schedule_and_keeps_pruned_weights_at_zero(scope):
    model = _model()
    pretrained = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    method = make_method("gmp", density=0.2, distribution="uniform", prune_start=0.2, prune_end=0.8,
                         prune_every=5, prune_scope=scope)
    report = method.prepare(model)
    for name, w in pretrained.items():  # a pretrained model keeps its weights until the first prune
        torch.testing.assert_close(model.get_submodule(name).theta(), w)
    assert report.density == 1.0
    opt = method.make_optimizer(model, "sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
    method.apply(model, opt, epochs=1, steps_per_epoch=50)
    total = sum(w.numel() for w in pretrained.values())
    masks = None
    for i, (x, y) in enumerate(_data(50), start=1):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        expect = cubic_density(i, 0.2, 10, 40) if (i > 10 and ((i - 10) % 5 == 0 or i >= 40)) else None
        if expect is not None and i <= 40:
            assert _nnz(model) == round(expect * total), i
        now = {n: m.dense_mask() for n, m in sparse_layers(model)}
        if masks is not None and now["0"] is not None and masks["0"] is not None:
            assert all(bool((now[n] <= masks[n]).all()) for n in now)  # a pruned weight stays pruned
        masks = {n: None if m is None else m.clone() for n, m in now.items()}
        _pruned_are_zero(model, opt)
    assert _nnz(model) == round(0.2 * total)
    if scope == "layer":
        assert [m.nnz() for _, m in sparse_layers(model)] == [40, 20]


def test_acdc_phases_by_hand():
    # 20 units, phases of 4, final 0.2 (the last 4 units sparse): D D D D S S S S D D D D S S S S S S S S
    pattern = "".join("S" if acdc_sparse(u, 4, 20, 0.2) else "D" for u in range(20))
    assert pattern == "DDDDSSSSDDDDSSSSSSSS"
    pattern = "".join("S" if acdc_sparse(u, 3, 20, 0.1) else "D" for u in range(20))
    assert pattern == "DDDSSSDDDSSSDDDSSSSS"
    # a final fraction shorter than one unit still ends sparse (before: 9 units ended on a dense unit)
    pattern = "".join("S" if acdc_sparse(u, 2, 8, 0.05) else "D" for u in range(8))
    assert pattern == "DDSSDDSS"
    pattern = "".join("S" if acdc_sparse(u, 2, 7, 0.05) else "D" for u in range(7))
    assert pattern == "DDSSDDS"
    pattern = "".join("S" if acdc_sparse(u, 2, 9, 0.05) else "D" for u in range(9))
    assert pattern == "DDSSDDSSS"


@pytest.mark.parametrize("signin", [False, True])
def test_acdc_alternates_dense_and_sparse(signin):
    model = _model()
    total = 10 * 20 + 20 * 5
    method = make_method("acdc", density=0.25, distribution="uniform", acdc_phase=4, acdc_unit="step",
                         acdc_final=0.2, signin=signin, reset_every=3, reset_unit="step")
    seen = []

    def check(i, model, opt):
        seen.append(_nnz(model))
        _pruned_are_zero(model, opt)

    opt = _run(method, model, 20, check)
    sparse, dense = round(0.25 * 200) + round(0.25 * 100), total
    # after step i the phase of unit i (0-based) is in place: DDDDSSSSDDDDSSSSSSSS shifted by one
    expect = [sparse if acdc_sparse(i, 4, 20, 0.2) else dense for i in range(1, 20)]
    assert seen[:19] == expect
    assert seen[-1] == sparse
    kinds = {m.param.kind for _, m in sparse_layers(model)}
    assert kinds == ({"signin"} if signin else {"masked"})
    assert method.phases == 3
    if signin:
        assert opt.num_resets > 0


@pytest.mark.parametrize("bad,match", [
    (("gmp", dict(layout="csr")), "layout"),
    (("gmp", dict(prune_start=0.9, prune_end=0.5)), "prune_start"),
    (("gmp", dict(prune_every=0)), "prune_every"),
    (("acdc", dict(acdc_phase=0)), "acdc_phase"),
    (("acdc", dict(dynamic="rigl")), "dynamic"),
    (("acdc", dict(acdc_final=2.0)), "acdc_final"),
])
def test_bad_options_name_the_argument(bad, match):
    name, opts = bad
    with pytest.raises(ValueError, match=match):
        make_method(name, **opts)


TINY = ["--data", "teacher", "--n-train", "384", "--n-test", "128", "--batch-size", "64", "--no-progress",
        "--epochs", "2"]


def test_the_cli_trains_every_new_mask_option(tmp_path, capsys):
    import json

    from sparse_engine.app import cli

    def train(*args):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        code = cli.main(["train", *args, "--out", str(out), *TINY])
        assert code == 0, capsys.readouterr().err
        return json.loads((out / "result.json").read_text())

    r = train("--method", "signin", "--dynamic", "rigl", "--update-every", "2", "--density", "0.2")
    assert r["epochs"][-1]["mask_updates"] == 4 and r["epochs"][-1]["regrown"] > 0  # steps 2, 4, 6, 8 of 12
    assert abs(r["density"] - 0.2) < 0.01
    for source in ("magnitude", "snip", "synflow"):
        r = train("--method", "static", "--mask", source, "--density", "0.3")
        assert abs(r["density"] - 0.3) < 0.01, source
    r = train("--method", "gmp", "--density", "0.3", "--prune-every", "2")
    assert r["epochs"][-1]["density"] == pytest.approx(0.3) and abs(r["density"] - 0.3) < 0.01
    r = train("--method", "acdc", "--signin", "--acdc-phase", "2", "--acdc-unit", "step", "--density", "0.3")
    assert r["epochs"][-1]["sparse_phase"] is True and abs(r["density"] - 0.3) < 0.01
    code = cli.main(["train", "--method", "signin", "--mask", str(tmp_path / "none.pt"), *TINY])
    assert code != 0 and "mask must be one of" in capsys.readouterr().err


def test_bench_dynamic_masks_quick_writes_its_csv(tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "dyn.csv"
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_dynamic_masks.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["case"] for r in rows] == ["rigl_capture", "rigl_update", "set_update", "step_static",
                                         "step_rigl_between", "step_rigl_update", "overhead"]
    assert all(float(r["time_ms"]) > 0 for r in rows[:-1])
    assert all(r["machine"] and r["commit"] and r["loadavg"] for r in rows)


RESUME_CASES = {
    "signin-rigl-csr": {"method": "signin", "dynamic": "rigl", "update_every": 2, "layout": "csr", "stop_at": 1.0},
    "static-set": {"method": "static", "dynamic": "set", "update_every": 4, "optimizer": "adamw", "lr": 0.01},
    "gmp": {"method": "gmp", "prune_every": 2},
    "acdc-signin": {"method": "acdc", "signin": True, "acdc_phase": 1, "acdc_final": 0.25},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_train_resume_mid_run_is_bit_identical(case, tmp_path, monkeypatch):
    from test_resume import BASE, assert_same, interrupt_in_epoch, metrics

    from sparse_engine.app.checkpoint import read_checkpoint
    from sparse_engine.app.config import TrainConfig
    from sparse_engine.app.loop import train

    cfg = dict(BASE, **RESUME_CASES[case])
    straight = train(TrainConfig(**cfg, out_dir=str(tmp_path / "straight")))
    with monkeypatch.context() as m:
        interrupt_in_epoch(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg, out_dir=str(tmp_path / "resumed")))
    resumed = train(TrainConfig(**cfg, out_dir=str(tmp_path / "resumed")), resume=tmp_path / "resumed")
    assert metrics(resumed) == metrics(straight)
    assert resumed["final"] == straight["final"] and resumed["density"] == straight["density"]
    _, a = read_checkpoint(tmp_path / "straight")
    _, b = read_checkpoint(tmp_path / "resumed")
    for key in ("model_state", "optimizer_state", "method_state"):
        assert_same(a[key], b[key], key)


@pytest.mark.parametrize("name, options", [("signin", {"dynamic": "rigl"}), ("static", {"dynamic": "set"})])
def test_mask_updates_refuse_a_sharded_model(name, options):
    """Mask updates rebuild whole masks and compact indices: an FSDP2-sharded parameter (one with DTensor
    placements) is refused in one line before training (gmp, acdc and PILoT prune sharded models: their
    2-process tests are in test_distributed.py)."""
    model = _model()
    method = make_method(name, density=0.5, **options)
    method.prepare(model)
    opt = method.make_optimizer(model, "sgd", lr=0.05)
    next(model.parameters()).placements = ("Shard(0)",)  # what FSDP2's DTensor parameters carry
    with pytest.raises(ValueError, match=f"{name} cannot train a sharded"):
        method.apply(model, opt, epochs=1, steps_per_epoch=4)


def test_static_without_mask_updates_still_trains_sharded_models():
    assert make_method("static", density=0.5).shardable and make_method("signin", density=0.5).shardable
    assert make_method("gmp", density=0.5).shardable and make_method("acdc", density=0.5).shardable

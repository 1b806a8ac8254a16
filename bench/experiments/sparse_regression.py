"""The 40 × 100 sparse linear regression of the PILoT paper: error against steps.

    python bench/experiments/sparse_regression.py            # default (well under a minute)
    python bench/experiments/sparse_regression.py --quick    # smoke test

Under-determined least squares: 40 samples x ~ N(0, I_100), y = x θ*, θ* 5-sparse with entries
±(1 + U[0, 1]); θ is trained as m ⊙ w by full-batch gradient descent with the library's optimizer
(``sparse_engine.optim.SGD``, α on both factors) from θ₀ ~ N(0, 0.1²). Variants:
* PILoT: β = 1, α decaying geometrically (α₀ · 0.8^epoch, 50 steps per epoch);
* constant α: β = 1, α = α₀ throughout;
* β = 0 (spred-style balanced start), decaying α;
* β = 1, α = 0 (no regulariser: the minimum-"L2-like"-norm interpolant).
Two draws of the truth's signs: "random" (independent of θ₀) and "adversarial" (opposite to θ₀ on the
support, so recovery needs sign flips, which β = 0 forbids). Records the relative error ‖θ − θ*‖/‖θ*‖
every 10 steps, the support recovery (top-5 of |θ| = support of θ*) and the training loss.
Writes sparse_regression.json and sparse_regression.png.
"""
from __future__ import annotations

import torch
from _common import environment, exceeds_spread, finish, log, mean_std, parser, save_fig, seeds_of, write_json

from sparse_engine.optim import SGD, AlphaSchedule
from sparse_engine.param import Parameterization

N, D, K = 40, 100, 5
LR, ALPHA0, RATE = 0.2, 0.1, 0.8
#: variant -> (β, α schedule kind, α₀)
VARIANTS = {"pilot (b=1, decaying a)": (1.0, "geometric", ALPHA0), "constant a (b=1)": (1.0, "constant", ALPHA0),
            "b=0 (spred), decaying a": (0.0, "geometric", ALPHA0), "b=1, a=0": (1.0, "constant", 0.0)}
SIGNS = ("random", "adversarial")


def problem(seed: int, signs: str):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    theta0 = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    support = torch.randperm(D, generator=g)[:K]
    mag = 1 + torch.rand(K, generator=g, dtype=torch.float64)
    sign = (-theta0[support].sign() if signs == "adversarial"
            else torch.where(torch.rand(K, generator=g) < 0.5, -1.0, 1.0).double())
    truth = torch.zeros(D, dtype=torch.float64)
    truth[support] = sign * mag
    return x, x @ truth, truth, theta0


def train(x, y, truth, theta0, beta: float, kind: str, alpha0: float, epochs: int, steps: int, every: int = 10):
    pz = Parameterization(theta0.reshape(1, D).clone(), "pilot", beta=1.0)
    if beta != 1.0:
        pz.reset(beta)  # factor θ₀ with the requested β (θ unchanged)
    opt = SGD([pz.m, pz.w], lr=LR, alpha=alpha0).bind(pz)
    sched = AlphaSchedule(kind, alpha0, RATE)
    curve, step = [], 0

    def record():
        th = pz.theta().detach().reshape(D)
        curve.append({"step": step, "rel_error": float((th - truth).norm() / truth.norm()),
                      "loss": float(((x @ th - y) ** 2).mean() / 2), "alpha": float(opt.param_groups[0]["alpha"])})

    record()
    for epoch in range(1, epochs + 1):
        for _ in range(steps):
            opt.zero_grad()
            ((x @ pz.theta().reshape(D) - y) ** 2).mean().div(2).backward()
            opt.step()
            step += 1
            if step % every == 0:
                record()
        opt.set_alpha(sched.update(epoch))
    th = pz.theta().detach().reshape(D)
    top = set(th.abs().topk(K).indices.tolist())
    return {"curve": curve, "final_rel_error": curve[-1]["rel_error"], "final_loss": curve[-1]["loss"],
            "support_recovered": top == set(truth.nonzero().flatten().tolist()),
            "sign_flips_vs_init": int((th.sign() * theta0.sign() < 0).sum()),
            "beta_mean_end": float((pz.m.detach() ** 2 - pz.w.detach() ** 2).mean())}


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    seeds = seeds_of(args) if args.seeds is not None or args.quick else list(range(5))
    epochs, steps = (4, 25) if args.quick else (20, 50)
    out = {"experiment": "sparse_regression", "quick": args.quick, "seeds": seeds,
           "settings": {"n": N, "d": D, "k": K, "lr": LR, "alpha0": ALPHA0, "rate": RATE, "epochs": epochs,
                        "steps_per_epoch": steps, "theta0_std": 0.1, "optimizer": "sparse_engine.optim.SGD, no momentum"},
           "variants": {k: {"beta": v[0], "alpha_schedule": v[1], "alpha0": v[2]} for k, v in VARIANTS.items()},
           "environment": environment(), "runs": [], "summary": {}}
    torch.set_num_threads(args.threads)
    for signs in SIGNS:
        for seed in seeds:
            x, y, truth, theta0 = problem(seed, signs)
            for name, (beta, kind, a0) in VARIANTS.items():
                r = train(x, y, truth, theta0, beta, kind, a0, epochs, steps)
                out["runs"].append({"signs": signs, "seed": seed, "variant": name, **r})
                log(f"{signs} seed {seed} {name}: rel error {r['final_rel_error']:.4f} support "
                    f"{r['support_recovered']} loss {r['final_loss']:.2e}")
    for signs in SIGNS:
        for name in VARIANTS:
            rs = [r for r in out["runs"] if r["signs"] == signs and r["variant"] == name]
            out["summary"][f"{signs}/{name}"] = {"rel_error": mean_std([r["final_rel_error"] for r in rs]),
                                                 "support_recovered": sum(r["support_recovered"] for r in rs),
                                                 "of": len(rs), "loss": mean_std([r["final_loss"] for r in rs])}
        pilot = out["summary"][f"{signs}/pilot (b=1, decaying a)"]["rel_error"]
        out["summary"][f"{signs}/pilot beats others beyond spread"] = {
            name: exceeds_spread(pilot, out["summary"][f"{signs}/{name}"]["rel_error"])
            and pilot["mean"] < out["summary"][f"{signs}/{name}"]["rel_error"]["mean"]
            for name in VARIANTS if not name.startswith("pilot")}
    path = args.out / "sparse_regression.json"
    write_json(path, out)
    finish(args, out, plot, None, "sparse_regression.png")
    for k, s in out["summary"].items():
        if "rel_error" in s:
            print(f"{k:<45} rel error {s['rel_error']['mean']:.4f} ± {s['rel_error']['std']:.4f}  "
                  f"support {s['support_recovered']}/{s['of']}")
    return 0


def plot(plt, out: dict, path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, signs in zip(axes, SIGNS):
        for i, name in enumerate(out["variants"]):
            rs = [r for r in out["runs"] if r["signs"] == signs and r["variant"] == name]
            steps = [c["step"] for c in rs[0]["curve"]]
            errs = torch.tensor([[c["rel_error"] for c in r["curve"]] for r in rs])
            mean, lo, hi = errs.mean(0), errs.min(0).values, errs.max(0).values
            color = f"C{i}"
            ax.plot(steps, mean, color=color, label=name)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("gradient step")
        ax.set_title(f"truth signs: {signs} (mean, band = min..max over {len(out['seeds'])} seeds)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("‖θ − θ*‖ / ‖θ*‖")
    axes[0].legend(fontsize=8)
    save_fig(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())

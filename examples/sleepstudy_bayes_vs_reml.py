"""The sleepstudy tutorial (docs/tutorials/sleepstudy.md): REML and NUTS side by side, and predictions.

18 subjects, reaction times over 10 days of sleep deprivation, a random intercept and
slope per subject.  The same Model is fitted by REML and by NUTS; the comparison table,
the variance components' posteriors against the REML estimates, predictions for a
known subject and for a new one, a posterior predictive check, LOO and R², and a
save/load round trip.

Run:  python examples/sleepstudy_bayes_vs_reml.py [FIGURE_DIR]
FIGURE_DIR (or the environment variable BAYESLMM_FIGURES) receives the figures; by
default a new temporary folder.  BAYESLMM_QUICK=1 runs short NUTS chains (for tests).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

import bayeslmm
from bayeslmm import Model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tutorial import figure_dir_for, settings  # noqa: E402


figure_dir = figure_dir_for("sleep")


def main(out_dir=None) -> dict:
    figures = figure_dir(out_dir)
    model = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")

    # 1. one model, two fits
    reml = model.fit(method="reml")
    bayes = model.fit(method="nuts", random_seed=1, progressbar=False, **settings())
    print(reml.summary(), end="\n\n")
    print(bayes.summary(), end="\n\n")

    # 2. side by side: posterior mean, sd and 89% interval beside the REML estimate, SE and interval
    side = bayeslmm.compare(bayes, reml)
    print(side, end="\n\n")
    print(side[["post_mean", "estimate", "diff_sd"]].round(3), end="\n\n")
    bayeslmm.variance_plot(bayes, reml).savefig(figures / "sleepstudy_variance_components.png", dpi=80)
    bayeslmm.caterpillar_plot(bayes).savefig(figures / "sleepstudy_caterpillar.png", dpi=80)

    # 3. predictions: subject 308 over days 0-9, and a subject the study did not see
    days = np.arange(10)
    known = pd.DataFrame({"Days": days, "Subject": "308"})
    new = pd.DataFrame({"Days": days, "Subject": "new"})
    reml_308 = reml.predict(known)
    post_308 = bayes.predict(known)                                          # mean of Xβ + Zb, 89% interval
    pred_308 = bayes.predict(known, predictive=True, random_seed=7)         # a new reaction time of 308
    pop = bayes.predict(new, new_groups="population")                       # the average subject
    drawn = bayes.predict(new, new_groups="sample", predictive=True, random_seed=7)  # one new subject
    table = pd.DataFrame({"REML 308": reml_308.to_numpy(), "NUTS 308": post_308["mean"].to_numpy(),
                          "308 mean lower": post_308["lower"].to_numpy(),
                          "308 mean upper": post_308["upper"].to_numpy(),
                          "308 new obs lower": pred_308["lower"].to_numpy(),
                          "308 new obs upper": pred_308["upper"].to_numpy(),
                          "new subject lower": drawn["lower"].to_numpy(),
                          "new subject upper": drawn["upper"].to_numpy()}, index=pd.Index(days, name="Days"))
    print(table.round(1).to_string(), end="\n\n")
    print(f"unseen levels predicted: {drawn.attrs.get('new_levels')}")
    print(f"marginal (population) prediction at day 9: {pop['mean'].iloc[-1]:.1f} "
          f"[{pop['lower'].iloc[-1]:.1f}, {pop['upper'].iloc[-1]:.1f}]\n")
    _prediction_figure(model.spec.data, days, post_308, pred_308, pop, drawn,
                       figures / "sleepstudy_predictions.png")

    # 4. checks: posterior predictive, LOO, R²
    bayeslmm.ppc_plot(bayes, random_seed=3).savefig(figures / "sleepstudy_ppc.png", dpi=80)
    loo = bayes.loo()
    k = np.asarray(loo.pareto_k).ravel()
    print(f"PSIS-LOO: elpd {float(loo.elpd):.1f} (se {float(loo.se):.1f}), p_loo {float(loo.p):.1f}; "
          f"Pareto k > 0.7 for {int((k > 0.7).sum())} of {k.size} observations (max {k.max():.2f})")
    worst = int(np.argmax(k))
    data = model.spec.data
    print(f"  the worst: subject {data['Subject'].iloc[worst]}, day {data['Days'].iloc[worst]}, "
          f"reaction {data['Reaction'].iloc[worst]:.1f} ms")
    print("R² (Nakagawa-Schielzeth-Johnson):")
    r2 = pd.concat({"REML": reml.r2(), "NUTS mean": bayes.r2()["mean"]}, axis=1)
    print(r2.round(3), end="\n\n")

    # 5. keep the fit: one netCDF file, loaded back to the same numbers
    with tempfile.TemporaryDirectory() as tmp:
        path = bayes.save(Path(tmp) / "sleepstudy_nuts.nc")
        again = bayeslmm.load(path)
        same = np.array_equal(again.posterior["beta"].to_numpy(), bayes.posterior["beta"].to_numpy())
        reloaded = bayeslmm.compare(again, reml, intervals="wald")
        same = same and np.array_equal(reloaded["post_mean"], side["post_mean"])
        print(f"saved to {path.name} ({path.stat().st_size / 1e6:.1f} MB); reloaded, the same draws and "
              f"comparison: {same}")
    print(f"figures written to {figures}")
    return {"reml": reml, "bayes": bayes, "compare": side, "predictions": table, "population": pop,
            "loo": loo, "r2": r2, "reloaded_same": same, "figures": figures}


def _prediction_figure(data, days, post_308, pred_308, pop, drawn, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.4), layout="constrained")
    a, b = fig.subplots(1, 2, sharey=True)
    rows = data[data["Subject"].astype(str) == "308"]
    a.fill_between(days, pred_308["lower"], pred_308["upper"], color="C0", alpha=0.15, label="new observation, 89%")
    a.fill_between(days, post_308["lower"], post_308["upper"], color="C0", alpha=0.35, label="mean, 89%")
    a.plot(days, post_308["mean"], color="C0", label="posterior mean")
    a.scatter(rows["Days"], rows["Reaction"], color="k", s=14, zorder=3, label="observed")
    a.set_title("subject 308 (conditional)", fontsize="medium")
    a.set_xlabel("Days")
    a.set_ylabel("Reaction (ms)")
    a.legend(fontsize="small")
    b.fill_between(days, drawn["lower"], drawn["upper"], color="C3", alpha=0.15, label="a new subject, 89%")
    b.fill_between(days, pop["lower"], pop["upper"], color="C3", alpha=0.35, label="population mean, 89%")
    b.plot(days, pop["mean"], color="C3", label="population mean")
    b.set_title("a subject not in the study", fontsize="medium")
    b.set_xlabel("Days")
    b.legend(fontsize="small")
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

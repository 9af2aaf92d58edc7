"""The partial pooling tutorial (docs/tutorials/partial_pooling.md): what a mixed model does to each group.

Complete pooling (one estimate for everybody), no pooling (each group on its own) and
partial pooling (the mixed model) side by side, first for the doctors' average mobility,
where the shrinkage has a closed form, then for the sleepstudy subjects' lines, where
intercept and slope shrink together, and finally by NUTS.

Run:  python examples/partial_pooling.py [FIGURE_DIR]
FIGURE_DIR (or the environment variable BAYESLMM_FIGURES) receives the figures; by
default a new temporary folder.  BAYESLMM_QUICK=1 runs short NUTS chains (for tests).
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd

import bayeslmm
from bayeslmm import Model
from bayeslmm.simulate import simulate_doctors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tutorial import figure_dir_for, settings  # noqa: E402


figure_dir = figure_dir_for("pooling")


def main(out_dir=None) -> dict:
    figures = figure_dir(out_dir)

    # 1. the doctors' average mobility: y_ij = β0 + u_j + ε_ij
    doctors = simulate_doctors(random_seed=2026)
    fit = Model("mobility ~ 1 + (1 | doctor)", doctors).fit(method="reml")
    table = bayeslmm.pooling_table(fit)
    n = table[("n", "")]
    show = [n.idxmin(), (n - n.median()).abs().idxmin(), n.idxmax()]
    print("complete, no and partial pooling of the doctors' mean mobility (REML):")
    print(table.loc[show].drop(columns=["population", "note"], level=0).round(3).to_string(), end="\n\n")
    # complete pooling weighs every patient alike; β0 weighs doctor j's mean by 1 / (σ²_u + σ²/n_j)
    s2u = float(fit.varcorr.loc[fit.varcorr.grp == "doctor", "vcov"].item())
    s2 = fit.sigma**2
    w = 1 / (s2u + s2 / n)
    gls = float(np.sum(w * table[("no_pooling", "(Intercept)")]) / np.sum(w))
    assert abs(gls - fit.fixef["(Intercept)"]) < 1e-8
    print(f"complete pooling: the mean of all {len(doctors):,} patients, {doctors['mobility'].mean():.3f}; "
          f"population β0 = {fit.fixef['(Intercept)']:.3f}, the doctors' means weighted by 1 / (σ²_u + σ²/n_j) "
          f"(by hand: {gls:.3f})\n")

    # closed form: b_j = λ_j (ȳ_j − β0), λ_j = n_j σ²_u / (n_j σ²_u + σ²), so shrinkage = 1 − λ_j
    lam = n * s2u / (n * s2u + s2)
    gap = float(np.max(np.abs(table[("shrinkage", "(Intercept)")] - (1 - lam))))
    print(f"σ²_u = {s2u:.3f}, σ² = {s2:.3f}: a doctor with n patients keeps λ = n σ²_u / (n σ²_u + σ²) of "
          f"their own deviation; the table's shrinkage equals 1 − λ to {gap:.1e}")
    for k in (2, 10, 21, 40):
        print(f"  n = {k:2d}: shrinkage {s2 / (k * s2u + s2):.3f}")
    print()
    bayeslmm.shrinkage_plot(fit).savefig(figures / "pooling_doctors_by_n.png", dpi=80)
    _shrinkage_factor_figure(n, table[("shrinkage", "(Intercept)")], s2u, s2, figures / "pooling_shrinkage_factor.png")

    # 2. sleepstudy: each subject's line; intercept and slope shrink together toward N(β, G)
    sleep = Model("Reaction ~ Days + (Days | Subject)", "sleepstudy")
    reml = sleep.fit(method="reml")
    lines = bayeslmm.pooling_table(reml)
    print("sleepstudy, three subjects (REML):")
    shown = lines.loc[["308", "309", "330"]].drop(columns=["population", "note"], level=0)
    print(shown.round(2).to_string(), end="\n\n")
    row = lines.loc["308"]
    print(f"subject 308's own slope {row[('no_pooling', 'Days')]:.2f} is pulled to {row[('partial', 'Days')]:.2f}; "
          f"its intercept moves from {row[('no_pooling', '(Intercept)')]:.2f} past the population "
          f"{lines.attrs['population']['(Intercept)']:.2f} to {row[('partial', '(Intercept)')]:.2f} "
          f"(shrinkage {row[('shrinkage', '(Intercept)')]:.2f})")
    mean_day = float(sleep.spec.data["Days"].mean())
    print(f"  the line stays near the subject's data at their mean day {mean_day:.1f}: own line there "
          f"{row[('no_pooling', '(Intercept)')] + mean_day * row[('no_pooling', 'Days')]:.1f}, mixed model "
          f"{row[('partial', '(Intercept)')] + mean_day * row[('partial', 'Days')]:.1f}\n")
    bayeslmm.shrinkage_plot(reml).savefig(figures / "pooling_sleepstudy_2d.png", dpi=80)

    # 3. the same by NUTS: posterior means of β + b_j
    bayes = sleep.fit(method="nuts", random_seed=1, progressbar=False, **settings())
    post = bayeslmm.pooling_table(bayes)
    both = pd.DataFrame({"REML (Intercept)": lines[("partial", "(Intercept)")],
                         "NUTS (Intercept)": post[("partial", "(Intercept)")],
                         "REML Days": lines[("partial", "Days")], "NUTS Days": post[("partial", "Days")]})
    print("partial pooling by REML and by NUTS (posterior means), three subjects:")
    print(both.loc[["308", "309", "330"]].round(2).to_string())
    diff = (both["NUTS Days"] - both["REML Days"]).abs()
    print(f"largest difference in a slope over the 18 subjects: {diff.max():.2f} (subject {diff.idxmax()})\n")
    bayeslmm.shrinkage_plot(bayes, columns="Days", layout="rows").savefig(figures / "pooling_sleepstudy_nuts.png",
                                                                          dpi=80)
    print(f"figures written to {figures}")
    return {"doctors": table, "closed_form_gap": gap, "s2u": s2u, "s2": s2, "sleep_reml": lines,
            "sleep_nuts": post, "reml_vs_nuts": both, "figures": figures}


def _shrinkage_factor_figure(n, shrink, s2u, s2, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = fig.subplots()
    grid = np.linspace(1, n.max(), 200)
    ax.plot(grid, s2 / (grid * s2u + s2), color="0.3", label="σ² / (n σ²_u + σ²)")
    ax.scatter(n, shrink, s=10, color="C3", alpha=0.6, label="each doctor (pooling_table)")
    ax.set_xlabel("patients of the doctor (n)")
    ax.set_ylabel("shrinkage toward β0")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

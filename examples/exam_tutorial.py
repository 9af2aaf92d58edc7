"""The exam tutorial (docs/tutorials/exam.md): 4,059 students in 65 London schools.

Complete pooling (one regression line for everybody), then a random intercept per school
and its intraclass correlation, then a random slope and its correlation with the
intercept, the variance of a student's score as a function of the intake score (the
seeds' formula), a likelihood-ratio test, and the same model by NUTS beside REML.

Run:  python examples/exam_tutorial.py [FIGURE_DIR]
FIGURE_DIR (or the environment variable BAYESLMM_FIGURES) receives the figures; by
default a new temporary folder.  BAYESLMM_QUICK=1 runs short NUTS chains (for tests).
"""

import sys
from pathlib import Path

import numpy as np

import bayeslmm
from bayeslmm import Model
from bayeslmm.datasets import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tutorial import figure_dir_for, settings  # noqa: E402


figure_dir = figure_dir_for("exam")


def main(out_dir=None) -> dict:
    figures = figure_dir(out_dir)
    exam = load_dataset("exam")
    sizes = exam.groupby("school", observed=True).size()
    print(f"{len(exam):,} students in {exam['school'].nunique()} schools "
          f"({sizes.min()} to {sizes.max()} students, median {sizes.median():.0f})\n")

    # 1. complete pooling: one least-squares line, every student independent (the seed's lm(y ~ x))
    X = np.column_stack([np.ones(len(exam)), exam["standLRT"]])
    ols, rss, *_ = np.linalg.lstsq(X, exam["normexam"].to_numpy(), rcond=None)
    ols_sigma = float(np.sqrt(rss[0] / (len(exam) - 2)))
    ols_se = ols_sigma * np.sqrt(np.diag(np.linalg.inv(X.T @ X)))
    print(f"complete pooling (OLS): intercept {ols[0]:.6f}, slope {ols[1]:.6f} (SE {ols_se[1]:.6f}), "
          f"residual sd {ols_sigma:.4f}\n")

    # 2. random intercept: schools differ in their average score
    intercept = Model("normexam ~ standLRT + (1 | school)", "exam").fit(method="reml")
    print(intercept.summary(), end="\n\n")
    icc = float(intercept.icc()["school"])
    vc = intercept.variance_components()
    print(vc.round(4), end="\n\n")
    print(f"intraclass correlation: {icc:.3f}")
    # the ICC is the correlation of two students of one school: V_j's off-diagonal over its diagonal
    V = intercept.marginal_covariance(1).to_numpy()
    print(f"school 1: {V.shape[0]} students; marginal covariance V = Z G Zᵀ + σ²I has "
          f"{V[0, 0]:.4f} on the diagonal and {V[0, 1]:.4f} off it; ratio {V[0, 1] / V[0, 0]:.3f}\n")

    # 3. random slope: the intake score's effect varies by school, correlated with the intercept
    slope = Model("normexam ~ standLRT + (standLRT | school)", "exam").fit(method="reml")
    print(slope.summary(), end="\n\n")
    svc = slope.varcorr
    sd0, sd1 = svc.loc[(svc.grp == "school") & svc.var2.isna(), "sdcor"].to_numpy()
    corr = float(svc.loc[svc.var2.notna(), "sdcor"].item())
    print(f"school sds: intercept {sd0:.4f}, slope {sd1:.4f}; their correlation {corr:.3f}\n")

    # 4. Var(y | x) = σ²_u0 + 2 σ_u01 x + σ²_u1 x² + σ²: the school share changes with the intake score
    grid = np.linspace(exam["standLRT"].min(), exam["standLRT"].max(), 61)
    total = np.array([slope.variance_components(at={"standLRT": x}).loc["Total", "variance"] for x in grid])
    share = np.array([float(slope.icc(at={"standLRT": x})["school"]) for x in grid])
    G = slope.block_covariances()[0]
    by_hand = G[0, 0] + 2 * G[0, 1] * grid + G[1, 1] * grid**2 + slope.sigma**2
    assert np.allclose(total, by_hand)
    print("school share of Var(y) at standLRT = x:")
    icc_at = {}
    for x in (-2.0, 0.0, 2.0):
        icc_at[x] = float(slope.icc(at={"standLRT": x})["school"])
        var_x = slope.variance_components(at={"standLRT": x}).loc["Total", "variance"]
        print(f"  x = {x:+.0f}: Var(y) = {var_x:.4f}, ICC = {icc_at[x]:.3f}")
    print()
    _variance_figure(grid, total, share, figures / "exam_variance_function.png")

    # 5. is the random slope needed?  lme4's anova: both refitted by ML, likelihood-ratio test
    table = bayeslmm.anova(intercept, slope, names=["intercept", "slope"])
    print(table, end="\n\n")
    lr = float(table.loc["slope", "Chisq"])

    # 6. the same random-slope model by NUTS, beside REML
    model = Model("normexam ~ standLRT + (standLRT | school)", "exam")
    bayes = model.fit(method="nuts", random_seed=2026, progressbar=False, **settings())
    print(bayes.summary(), end="\n\n")
    side = bayeslmm.compare(bayes, slope)
    print(side, end="\n\n")
    icc_post = bayes.icc(at={"standLRT": 0.0})
    print(f"posterior ICC at standLRT = 0: mean {icc_post.loc['school', 'mean']:.3f}, "
          f"89% interval [{icc_post.loc['school', 'lower']:.3f}, {icc_post.loc['school', 'upper']:.3f}]")
    post_corr = side.loc["corr[school|(Intercept),standLRT]"]
    print(f"posterior correlation of intercepts and slopes: mean {post_corr.post_mean:.3f}, "
          f"89% interval [{post_corr.post_lower:.3f}, {post_corr.post_upper:.3f}]\n")

    # 7. partial pooling of the schools' lines; the smallest school shows it best
    pool = bayeslmm.pooling_table(slope)
    smallest = pool[("n", "")].idxmin()
    row = pool.loc[smallest]
    print(f"school {smallest} ({row[('n', '')]} students): own line {row[('no_pooling', '(Intercept)')]:.3f} "
          f"+ {row[('no_pooling', 'standLRT')]:.3f}·x, mixed model {row[('partial', '(Intercept)')]:.3f} "
          f"+ {row[('partial', 'standLRT')]:.3f}·x (shrinkage of the slope {row[('shrinkage', 'standLRT')]:.3f})")
    fig = bayeslmm.shrinkage_plot(slope)
    ax = fig.axes[0]
    others = pool.drop(index=smallest)
    lo = others[["no_pooling", "partial"]].min()
    hi = others[["no_pooling", "partial"]].max()
    ax.set_xlim(min(lo[("no_pooling", "(Intercept)")], lo[("partial", "(Intercept)")]) - 0.1,
                max(hi[("no_pooling", "(Intercept)")], hi[("partial", "(Intercept)")]) + 0.1)
    ax.set_ylim(min(lo[("no_pooling", "standLRT")], lo[("partial", "standLRT")]) - 0.1,
                max(hi[("no_pooling", "standLRT")], hi[("partial", "standLRT")]) + 0.1)
    ax.set_title(f"Shrinkage of the schools' lines (REML); school {smallest}'s own line "
                 f"({row[('no_pooling', '(Intercept)')]:.2f}, {row[('no_pooling', 'standLRT')]:.2f}) is off the chart",
                 fontsize="small")
    fig.savefig(figures / "exam_shrinkage.png", dpi=80)
    bayeslmm.variance_plot(bayes, slope).savefig(figures / "exam_variance_components.png", dpi=80)
    print(f"figures written to {figures}")
    return {"icc": icc, "corr": corr, "lr": lr, "ols": ols, "ols_se": ols_se, "ols_sigma": ols_sigma, "icc_at": icc_at,
            "intercept": intercept, "slope": slope, "bayes": bayes, "compare": side, "pooling": pool,
            "figures": figures}


def _variance_figure(grid, total, share, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    a.plot(grid, total, color="C0")
    a.set_xlabel("standLRT (intake score)")
    a.set_ylabel("Var(normexam | standLRT)")
    a.set_title("σ²_u0 + 2σ_u01·x + σ²_u1·x² + σ²", fontsize="medium")
    b.plot(grid, share, color="C3")
    b.set_xlabel("standLRT (intake score)")
    b.set_ylabel("school share (ICC)")
    b.set_title("intraclass correlation at x", fontsize="medium")
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

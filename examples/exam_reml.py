"""The exam story from the seeds, by REML: 4,059 students in 65 London schools.

Run: python examples/exam_reml.py
"""

from bayeslmm import Model
from bayeslmm.datasets import load_dataset


def main() -> dict:
    exam = load_dataset("exam")

    # 1. random intercept: schools differ in their average score
    intercept = Model("normexam ~ standLRT + (1 | school)", exam).fit(method="reml")
    print(intercept.summary(), end="\n\n")
    vc = intercept.varcorr
    school_var = vc.loc[vc.grp == "school", "vcov"].item()
    icc = school_var / (school_var + intercept.sigma**2)
    print(f"intraclass correlation: {icc:.3f} — two students of one school correlate this much\n")

    # 2. random slope: the intake score's effect differs between schools, and correlates
    slope = Model("normexam ~ standLRT + (standLRT | school)", exam).fit(method="reml")
    print(slope.summary(), end="\n\n")
    corr = slope.varcorr.dropna(subset=["var2"]).sdcor.item()
    print(f"correlation of school intercepts and slopes: {corr:.2f}")

    # the same model in the grouping-columns form
    same = Model("normexam ~ standLRT", exam, groups={"school": "1 + standLRT"}).fit(method="reml")
    assert abs(same.objective - slope.objective) < 1e-8

    # 3. ML fits compared by a likelihood-ratio statistic (nested models)
    ml0 = Model("normexam ~ standLRT + (1 | school)", exam).fit(method="ml")
    ml1 = Model("normexam ~ standLRT + (standLRT | school)", exam).fit(method="ml")
    lr = ml0.objective - ml1.objective
    print(f"likelihood-ratio statistic, slope vs intercept only: {lr:.1f} on 2 df; "
          f"AIC {ml0.aic:.1f} → {ml1.aic:.1f}")

    # 4. a school's marginal covariance: V_j = Z_j G Z_jᵀ + σ² I
    V = slope.marginal_covariance(1)
    print(f"school 1: {V.shape[0]} students, marginal variances from {V.values.diagonal().min():.3f} "
          f"to {V.values.diagonal().max():.3f}")
    return {"icc": icc, "corr": corr, "lr": lr}


if __name__ == "__main__":
    main()

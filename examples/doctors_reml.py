"""The doctors/patients story from the seeds: simulate 407 doctors and 8,525 patients,
fit a random intercept per doctor by REML, and compare with the truth.

Run: python examples/doctors_reml.py
"""

from bayeslmm import Model
from bayeslmm.simulate import simulate_doctors


def main() -> dict:
    data = simulate_doctors(random_seed=2026)
    truth = data.attrs["truth"]
    print(f"{data['doctor'].nunique()} doctors, {len(data)} patients "
          f"({data.groupby('doctor', observed=True).size().min()} to "
          f"{data.groupby('doctor', observed=True).size().max()} each)\n")
    fit = Model("mobility ~ age + married + sex + rbc + wbc + (1 | doctor)", data).fit(method="reml")
    print(fit.summary(), end="\n\n")
    print("fixed effects: estimate (truth)")
    for name, est in fit.fixef.items():
        print(f"  {name:12s} {est:8.3f} ({truth['beta'][name]:.3f})")
    sd_doctor = fit.varcorr.loc[fit.varcorr.grp == "doctor", "sdcor"].item()
    print(f"doctor sd {sd_doctor:.3f} ({truth['sd_intercept']}), residual sd {fit.sigma:.3f} ({truth['sigma']})")
    return {"fit": fit, "truth": truth}


if __name__ == "__main__":
    main()

"""The doctors tutorial (docs/tutorials/doctors.md): 407 doctors, 8,525 patients.

The seeds' simulated design: each doctor sees 2 to 40 patients; mobility depends on six
fixed effects (intercept, age, married, sex, red and white blood cell counts) and on a
random intercept per doctor.  Because the data are simulated, every estimate can be held
against the truth: by REML, by NUTS, side by side; the intraclass correlation; and
predictions for a patient of a known doctor and of a new one.

Run:  python examples/doctors_tutorial.py [FIGURE_DIR]
FIGURE_DIR (or the environment variable BAYESLMM_FIGURES) receives the figures; by
default a new temporary folder.  BAYESLMM_QUICK=1 runs short NUTS chains (for tests).
"""

import sys
from pathlib import Path

import pandas as pd

import bayeslmm
from bayeslmm import Model
from bayeslmm.simulate import simulate_doctors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tutorial import figure_dir_for, settings  # noqa: E402

FORMULA = "mobility ~ age + married + sex + rbc + wbc + (1 | doctor)"


figure_dir = figure_dir_for("doctors")


def main(out_dir=None) -> dict:
    figures = figure_dir(out_dir)
    data = simulate_doctors(random_seed=2026)
    truth = data.attrs["truth"]
    per_doctor = data.groupby("doctor", observed=True).size()
    print(f"{data['doctor'].nunique()} doctors, {len(data):,} patients, {per_doctor.min()} to {per_doctor.max()} "
          f"per doctor (mean {per_doctor.mean():.1f})")
    print(data.head().round(2).to_string(), end="\n\n")

    model = Model(FORMULA, data)
    model.data_name = "simulate_doctors(random_seed=2026)"
    reml = model.fit(method="reml")
    print(reml.summary(), end="\n\n")
    bayes = model.fit(method="nuts", random_seed=2026, progressbar=False, **settings())
    print(bayes.summary(), end="\n\n")

    # every parameter beside the truth
    side = bayeslmm.compare(bayes, reml)
    true_values = [truth["beta"][name] for name in reml.fixef.index] + [truth["sd_intercept"], truth["sigma"]]
    side_truth = pd.DataFrame({"truth": true_values, "REML": side["estimate"], "REML lower": side["lower"],
                               "REML upper": side["upper"], "posterior mean": side["post_mean"],
                               "post lower": side["post_lower"], "post upper": side["post_upper"]},
                              index=side.index)
    side_truth["posterior covers"] = ((side_truth["post lower"] <= side_truth["truth"])
                                      & (side_truth["truth"] <= side_truth["post upper"]))
    print(side, end="\n\n")
    print("Against the truth (89% intervals):")
    print(side_truth.round(3).to_string(), end="\n\n")

    # how alike are two patients of one doctor?
    true_icc = truth["sd_intercept"] ** 2 / (truth["sd_intercept"] ** 2 + truth["sigma"] ** 2)
    icc_reml = float(reml.icc()["doctor"])
    icc_post = bayes.icc().loc["doctor"]
    print(f"ICC: truth {true_icc:.3f}, REML {icc_reml:.3f}, posterior {icc_post['mean']:.3f} "
          f"[{icc_post['lower']:.3f}, {icc_post['upper']:.3f}]\n")

    # a 60-year-old married woman (sex = 1), rbc 4.5, wbc 6, treated by doctor 1 or by a new doctor
    patient = {"age": 60.0, "married": 1, "sex": 1, "rbc": 4.5, "wbc": 6.0}
    newdata = pd.DataFrame([{**patient, "doctor": "1"}, {**patient, "doctor": "new"}])
    mean = bayes.predict(newdata, new_groups="population")
    new_obs = bayes.predict(newdata, new_groups="sample", predictive=True, random_seed=5)
    pred = pd.DataFrame({"doctor": newdata["doctor"], "REML": reml.predict(newdata).to_numpy(),
                         "posterior mean": mean["mean"].to_numpy(), "mean lower": mean["lower"].to_numpy(),
                         "mean upper": mean["upper"].to_numpy(), "new patient lower": new_obs["lower"].to_numpy(),
                         "new patient upper": new_obs["upper"].to_numpy()})
    print("Mobility predicted for one patient:")
    print(pred.round(2).to_string(index=False), end="\n\n")

    bayeslmm.caterpillar_plot(reml).savefig(figures / "doctors_caterpillar.png", dpi=80)
    bayeslmm.variance_plot(bayes, reml).savefig(figures / "doctors_variance_components.png", dpi=80)
    print(f"figures written to {figures}")
    return {"reml": reml, "bayes": bayes, "truth": truth, "compare": side, "against_truth": side_truth,
            "icc": {"truth": true_icc, "reml": icc_reml, "posterior": float(icc_post["mean"])},
            "predictions": pred, "figures": figures}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

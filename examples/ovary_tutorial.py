"""The Ovary tutorial (docs/tutorials/ovary.md): AR(1) residuals within mares.

11 mares, their large ovarian follicles counted daily over an estrus cycle (nlme's
``Ovary``, bundled).  The model of Pinheiro & Bates (2000, ch. 5): a yearly-cycle
sine and cosine of time as fixed effects, an independent random intercept and sine
per mare, first with independent residuals (R = σ²I), then with an AR(1) correlation
between a mare's consecutive days.  The normalised residuals' autocorrelation within
mares, before and after, shows what the AR(1) structure takes up.

Run:  python examples/ovary_tutorial.py [FIGURE_DIR]
FIGURE_DIR (or the environment variable BAYESLMM_FIGURES) receives the figure; by
default a new temporary folder.  REML only: nothing here is sampled.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import bayeslmm  # noqa: E402
from bayeslmm import CorAR1, Model  # noqa: E402
from bayeslmm.datasets import load_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tutorial import figure_dir_for  # noqa: E402

# sin(2πt), cos(2πt) as columns: formulae has no np.pi, and the names print short
FORMULA = "follicles ~ sin2piT + cos2piT + (sin2piT || Mare)"
MAX_LAG = 10

figure_dir = figure_dir_for("ovary")


def acf_by_group(residuals: np.ndarray, groups: np.ndarray, max_lag: int = MAX_LAG) -> pd.DataFrame:
    """Autocorrelation by lag of residuals in row order within each group, as nlme's ``ACF``.

    Lag k: the mean of r_t·r_{t+k} over the n_k pairs k rows apart in one group (no pair
    crosses two groups), divided by the mean of r_t² (lag 0).  Not centred: normalised
    residuals have mean 0 under the model.
    """
    sums, pairs = np.zeros(max_lag + 1), np.zeros(max_lag + 1, dtype=int)
    for g in pd.unique(groups):
        r = residuals[groups == g]
        for k in range(min(max_lag, len(r) - 1) + 1):
            sums[k] += r[: len(r) - k] @ r[k:]
            pairs[k] += len(r) - k
    means = sums / pairs
    return pd.DataFrame({"acf": means / means[0], "pairs": pairs}, index=pd.RangeIndex(max_lag + 1, name="lag"))


def main(out_dir=None) -> dict:
    figures = figure_dir(out_dir)
    ovary = load_dataset("Ovary")
    ovary["sin2piT"] = np.sin(2 * np.pi * ovary["Time"])
    ovary["cos2piT"] = np.cos(2 * np.pi * ovary["Time"])
    days = ovary.groupby("Mare", observed=True).size()
    print(f"{len(ovary)} days of {len(days)} mares ({days.min()} to {days.max()} per mare)")
    print(ovary.head().round(4).to_string(), end="\n\n")

    base = Model(FORMULA, ovary).fit()
    ar1 = Model(FORMULA, ovary, correlation=CorAR1("Mare")).fit()  # nlme: correlation = corAR1()
    print(base.summary(), end="\n\n")
    print(ar1.summary(), end="\n\n")
    print(f"REML log-likelihood: sigma^2 I {base.loglik:.4f}, AR(1) {ar1.loglik:.4f}")
    lr_table = bayeslmm.anova(base, ar1, refit=False)  # same fixed effects: REML fits compare as they are
    print(lr_table, end="\n\n")

    phi = ar1.residual_params["Phi"]
    print(f"Phi = {phi:.4f}: a mare's residuals k days apart correlate Phi^k")
    print("  " + ", ".join(f"k = {k}: {phi ** k:.3f}" for k in range(1, 6)), end="\n\n")

    kr, sat = ar1.fixef_table(ddf="kenward-roger"), ar1.fixef_table()
    small = pd.DataFrame({"estimate": kr["estimate"], "SE KR": kr["std_error"], "df KR": kr["df"],
                          "SE Satt": sat["std_error"], "df Satt": sat["df"]})
    print("Kenward-Roger and Satterthwaite, AR(1) fit:")
    print(small.round(4).to_string(), end="\n\n")
    ci = ar1.confint()  # profile likelihood, Phi and sigma included
    print(f"Phi {phi:.4f}: 95% profile interval ({ci.loc['Phi', 'lower']:.4f}, {ci.loc['Phi', 'upper']:.4f}); "
          f"sigma {ar1.sigma:.4f}: ({ci.loc['sigma', 'lower']:.4f}, {ci.loc['sigma', 'upper']:.4f})", end="\n\n")

    mares = ovary["Mare"].to_numpy()
    before = acf_by_group(base.normalized_residuals.to_numpy(), mares)
    after = acf_by_group(ar1.normalized_residuals.to_numpy(), mares)
    acf = pd.DataFrame({"sigma2 I": before["acf"], "AR(1)": after["acf"], "Phi^k": phi ** before.index,
                        "pairs": before["pairs"]})
    band = 1.96 / np.sqrt(acf["pairs"])
    print("Autocorrelation of the normalised residuals within mares (nlme's ACF):")
    print(acf.round(4).to_string(), end="\n\n")
    print(f"lags outside ±1.96/sqrt(pairs): sigma^2 I {_outside(acf['sigma2 I'], band)}, "
          f"AR(1) {_outside(acf['AR(1)'], band)}\n")

    acf_figure(acf, band).savefig(figures / "ovary_acf.png", dpi=80)
    print(f"figures written to {figures}")
    return {"base": base, "ar1": ar1, "anova": lr_table, "acf": acf, "phi": phi, "kenward_roger": small,
            "confint": ci, "figures": figures}


def _outside(values: pd.Series, band: pd.Series) -> list[int]:
    """The lags ≥ 1 where |ACF| exceeds the band."""
    return [int(k) for k in values.index[1:] if abs(values[k]) > band[k]]


def acf_figure(acf: pd.DataFrame, band: pd.Series):
    """Bars of the ACF by lag before and after, the AR(1) model's φ^k, and the ±1.96/√pairs band."""
    lags = acf.index.to_numpy()[1:]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(lags - 0.18, acf["sigma2 I"].to_numpy()[1:], width=0.36, label="σ²I fit", color="tab:red")
    ax.bar(lags + 0.18, acf["AR(1)"].to_numpy()[1:], width=0.36, label="AR(1) fit", color="tab:blue")
    ax.plot(lags, acf["Phi^k"].to_numpy()[1:], "k.--",
            label=r"$\hat\phi^k$: the AR(1) fit's correlation of $\epsilon$ at lag k")
    ax.fill_between(lags, -band.to_numpy()[1:], band.to_numpy()[1:], color="grey", alpha=0.2,
                    label="±1.96/√pairs")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="lag (days, within a mare)", ylabel="autocorrelation of normalised residuals",
           title="Ovary: residual autocorrelation before and after AR(1)", xticks=lags)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

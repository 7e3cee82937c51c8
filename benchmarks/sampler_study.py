"""Steps versus quality for every ldmkit sampler, with a denoiser whose exact answer is known.

Run by hand (about 3 minutes on 2 cores):
    python benchmarks/sampler_study.py [--samples 4096] [--dim 32] [--steps 5 10 20 50 100]
Writes benchmarks/results/sampler_study.json and docs/sampler_study.png, and prints the tables of
docs/sampler-study.md.

The "network" is the exact noise prediction of a Gaussian mixture (``ldmkit.testing.gmm_denoiser``) under the
published LDM noise schedule (scaled_linear betas 0.00085..0.012, 1000 steps). Every sampler starts from the
same noise; the samplers and the loop that runs them are ``ldmkit.testing.samplers``.

* Deterministic samplers are measured against the exact probability-flow ODE solution from the same ``x_T``
  (an adaptive 8th-order solve down to the lowest trained noise level, then the x_0 prediction there, as
  the samplers end; cross-checked against 999-step DDIM, DPM-Solver++ 2M and DPM-Solver++ 2M Karras): all
  of them discretise that one ODE, so its solution is the image the model means. A per-family reference
  would hide what a family gets wrong at every step count (a late start with ``leading`` spacing, CompVis
  DDIM stopping at ``alphas_cumprod[0]`` instead of x_0), which users do see. Measures: the median over
  samples of the per-sample RMS error (the typical image), and the fraction of samples ending in another
  mixture component than the exact solution.
* Every sampler, and the only measure for the stochastic ones (whose output is random for one ``x_T``), gets
  distributional errors against the data: the sliced Wasserstein-2 distance to exact mixture samples, the
  total-variation error of the component weights (mean posterior responsibility, unbiased for exact
  samples), and the errors of the mean and covariance against their closed forms. The same measures between
  two independent exact sample sets give the noise floor.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import ldmkit.schedulers as ls
from ldmkit.testing.gmm_denoiser import ExactEpsModel, GaussianMixture, probability_flow_reference
from ldmkit.testing.samplers import LDM_BETAS, SAMPLERS, path_errors, run_sampler

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sampler_study.json"
PLOT = ROOT / "docs" / "sampler_study.png"
STEPS = (5, 10, 20, 50, 100)
# 1000 linspace steps repeat timestep 500 in DPM-Solver and UniPC (as in diffusers): a zero-length step
# divides by zero (NaN). 999 steps cover every training step once.
REFERENCE_STEPS = 999


# ------------------------------------------------------------------------------------------------ measures


def random_directions(dim: int, count: int = 256, seed: int = 0) -> torch.Tensor:
    d = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 (Bonneel et al. 2015): the root mean over unit directions of the squared W2
    between the 1-D projections, which for equal sample counts is the mean squared gap of sorted values."""
    pa, pb = (a @ directions.T).sort(dim=0).values, (b @ directions.T).sort(dim=0).values
    return (pa - pb).pow(2).mean().sqrt().item()


def distribution_errors(gmm: GaussianMixture, x: torch.Tensor, exact: torch.Tensor,
                        directions: torch.Tensor) -> dict:
    cov, cov_hat = gmm.covariance(), torch.cov(x.T)
    return {
        "sw2": sliced_w2(x, exact, directions),
        "weight_tv": 0.5 * (gmm.responsibilities(x).mean(0) - gmm.weights).abs().sum().item(),
        "mean_err": ((x.mean(0) - gmm.mean()).norm() / math.sqrt(gmm.dim)).item(),
        "cov_err": ((cov_hat - cov).norm() / cov.norm()).item(),
    }


# ---------------------------------------------------------------------------------------------------- study


def study(samples: int = 4096, dim: int = 32, steps=STEPS, samplers=SAMPLERS, seed: int = 0,
          cross_check: bool = True, log=print) -> dict:
    """Run every sampler at every step count from the same noise; return all measures (JSON-able)."""
    gmm = GaussianMixture.random(dim=dim, seed=seed)
    alphas_cumprod = ls.DDIMScheduler(**LDM_BETAS).alphas_cumprod
    model = ExactEpsModel(gmm, alphas_cumprod)
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(samples, dim, generator=gen, dtype=torch.float64)
    exact, exact_again = gmm.sample(samples, gen), gmm.sample(samples, gen)
    directions = random_directions(dim, seed=seed)

    started = time.time()
    sigma_max, sigma_min = math.exp(model.log_sigmas[-1]), math.exp(model.log_sigmas[0])
    reference = probability_flow_reference(gmm, noise, sigma_max, sigma_min)
    results = {
        "setup": {"samples": samples, "dim": dim, "components": len(gmm.weights), "seed": seed,
                  "weights": gmm.weights.tolist(), "betas": LDM_BETAS, "sigma_max": sigma_max, "sigma_min": sigma_min,
                  "data_std": gmm.covariance().diagonal().mean().sqrt().item()},
        "floor": distribution_errors(gmm, exact_again, exact, directions),
        "reference": {"method": "DOP853, rtol = atol = 1e-10", "seconds": round(time.time() - started, 1),
                      "distribution": distribution_errors(gmm, reference, exact, directions)},
        "samplers": {},
    }
    log(f"reference ODE solved in {results['reference']['seconds']} s")
    if cross_check:
        # The ODE started from the true x_T distribution instead of N(0, I) (alpha_bar_T is not 0).
        a_T = alphas_cumprod[-1].item() ** 0.5
        x_T = a_T * gmm.sample(samples, gen) + (1 - a_T**2) ** 0.5 * torch.randn(samples, dim, generator=gen,
                                                                             dtype=torch.float64)
        from_true_x_T = probability_flow_reference(gmm, x_T, sigma_max, sigma_min)
        results["reference"]["distribution, started from the true x_T"] = distribution_errors(
            gmm, from_true_x_T, exact, directions)
        for name in ("DDIM", "DPM-Solver++ 2M", "DPM-Solver++ 2M Karras"):
            sampler = next(s for s in samplers if s.name == name)
            x, _ = run_sampler(sampler.build(), model, noise, REFERENCE_STEPS)
            errors = path_errors(gmm, x, reference)
            results["reference"][f"{name} at {REFERENCE_STEPS} steps"] = errors
            log(f"{name} at {REFERENCE_STEPS} steps against the reference: {errors}")

    for sampler in samplers:
        runs = []
        for n in (*steps, REFERENCE_STEPS) if sampler.stochastic else steps:
            x, nfe = run_sampler(sampler.build(), model, noise, n, seed=seed)
            run = {"steps": n, "nfe": nfe, **distribution_errors(gmm, x, exact, directions)}
            if not sampler.stochastic:
                run.update(path_errors(gmm, x, reference))
            runs.append(run)
        results["samplers"][sampler.name] = {"stochastic": sampler.stochastic, "note": sampler.note, "runs": runs}
        log(f"{sampler.name}: " + ", ".join(f"{r['steps']}: {r.get('median_err', r['sw2']):.4f}" for r in runs))
    results["seconds"] = round(time.time() - started, 1)
    return results


# ------------------------------------------------------------------------------------------------- reporting


def _measured_steps(results: dict) -> list[int]:
    runs = next(iter(results["samplers"].values()))["runs"]
    return [r["steps"] for r in runs if r["steps"] != REFERENCE_STEPS]


def _table(results: dict, names: list[str], key: str, fmt: str, label=lambda name: name) -> list[str]:
    """One markdown table: a row per sampler, a column per step count, NFE in brackets where it differs."""
    steps = _measured_steps(results)
    lines = ["| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|" + "---:|" * len(steps)]
    for name in names:
        runs = {r["steps"]: r for r in results["samplers"][name]["runs"]}
        cells = [format(runs[n][key], fmt) + ("" if runs[n]["nfe"] == n else f" ({runs[n]['nfe']})") for n in steps]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return lines


def cheapest_nfe(results: dict, name: str, key: str, target: float) -> int | None:
    """The fewest model evaluations among the measured step counts that reach ``key <= target``."""
    hits = [r["nfe"] for r in results["samplers"][name]["runs"] if r.get(key, math.inf) <= target]
    return min(hits) if hits else None


def markdown_tables(results: dict) -> str:
    samplers = results["samplers"]
    deterministic = [n for n, s in samplers.items() if not s["stochastic"]]
    stochastic = [n for n, s in samplers.items() if s["stochastic"]]
    floor = results["floor"]
    out = ["Typical path error: median over samples of the per-sample RMS distance to the exact ODE solution "
           "(NFE in brackets where it differs from the steps):", ""]
    out += _table(results, deterministic, "median_err", ".4f")
    out += ["", "Samples ending in another mixture component than the exact solution (%):", ""]
    out += [line.replace("0.", " 0.") for line in _table(results, deterministic, "flip_rate", ".2%")]
    out += ["", f"Sliced W2 to exact data samples (floor, two exact sample sets: {floor['sw2']:.4f}):", ""]
    out += _table(results, list(samplers), "sw2", ".4f")
    out += ["", f"Stochastic samplers: component-weight TV error (floor {floor['weight_tv']:.4f}) and covariance "
            f"relative error (floor {floor['cov_err']:.4f}):", ""]
    out += _table(results, stochastic, "weight_tv", ".4f", lambda n: f"{n}, weights")
    out += _table(results, stochastic, "cov_err", ".4f", lambda n: f"{n}, covariance")[2:]
    out += ["", "Fewest model evaluations (among the measured step counts) for a typical path error of at most:", "",
            "| sampler | 0.05 | 0.02 | 0.01 | 0.005 |", "|---|---:|---:|---:|---:|"]
    for name in deterministic:
        cells = [cheapest_nfe(results, name, "median_err", t) for t in (0.05, 0.02, 0.01, 0.005)]
        out.append(f"| {name} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = [("median_err", "typical path error (median RMS to exact ODE)", "Deterministic: typical error"),
              ("flip_rate", "fraction ending in another component", "Deterministic: changed component"),
              ("sw2", "sliced W2 to data samples", "All samplers: distribution (dashed: stochastic)")]
    markers = "os^vD<>ph*Xd"
    colors = plt.get_cmap("tab20").colors
    none = 0.5 / results["setup"]["samples"]  # where "no sample changed component" is drawn on the log axis
    for i, (name, s) in enumerate(results["samplers"].items()):
        runs = [r for r in s["runs"] if r["steps"] != REFERENCE_STEPS]
        nfe = [r["nfe"] for r in runs]
        style = dict(ls="--" if s["stochastic"] else "-", marker=markers[i % len(markers)], ms=4, label=name,
                     color=colors[i % len(colors)])
        for ax, (key, _, _) in zip(axes, panels):
            if key in runs[0]:
                ax.plot(nfe, [max(r[key], none) for r in runs], **style)
    no_flip = axes[1].axhline(none, color="grey", lw=1, ls=":", label="none of the samples")
    axes[2].axhline(results["floor"]["sw2"], color="grey", lw=1, ls=":", label="floor (exact vs exact)")
    axes[2].axhline(results["reference"]["distribution"]["sw2"], color="black", lw=1, ls="-.",
                    label="exact ODE solution from N(0, I)")
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(handles=[no_flip], fontsize=7)
    axes[2].legend(fontsize=6)
    setup = results["setup"]
    fig.suptitle(f"Exact Gaussian-mixture denoiser (D={setup['dim']}, K={setup['components']}, "
                 f"N={setup['samples']}), LDM scaled_linear schedule", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    parser.add_argument("--replot", action="store_true", help="only redraw the plot and tables from --json")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(args.json.read_text())
    else:
        torch.set_num_threads(1)  # small matrices: threads only add overhead on a shared CPU
        results = study(args.samples, args.dim, args.steps, seed=args.seed)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)
    print(markdown_tables(results))
    print(f"\nwrote {args.json} and {args.plot} in {results['seconds']} s")


if __name__ == "__main__":
    main()

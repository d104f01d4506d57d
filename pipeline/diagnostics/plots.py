"""PNG figures of the diagnostics' JSON reports (matplotlib, Agg backend: no display needed).

Each function takes the report the diagnostic wrote (pipeline/diagnostics/cli.py) and a path, writes the PNG
and returns the path, so a figure can always be redrawn from diagnostics.json alone.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless training nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def widest_operator(spectra: dict[str, dict[str, dict]]) -> tuple[str, str, dict] | None:
    """(net, layer, operator report) of the conv whose per-frequency sigma_max is largest, or None without one."""
    found = [(net, name, layer["operator"]) for net, layers in spectra.items() for name, layer in layers.items()
             if "operator" in layer]
    return max(found, key=lambda t: t[2]["sigma_max"]) if found else None


def plot_weights(spectra: dict[str, dict[str, dict]], path: str | Path) -> Path:
    """Left: sigma_max of each layer's reshaped weight, per net. Right: sigma_max(f) of one conv as an operator."""
    fig, (ax, ax_map) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for net, layers in spectra.items():
        sigmas = [layer["sigma_max"] for layer in layers.values()]
        ax.plot(range(len(sigmas)), sigmas, marker="o", label=f"{net} ({len(sigmas)} layers)")
    ax.set(xlabel="layer (module order)", ylabel="sigma_max of W reshaped (out, -1)", yscale="log",
           title="top singular value per layer")
    ax.legend()
    top = widest_operator(spectra)
    if top is None:
        ax_map.axis("off")
    else:
        net, name, op = top
        # fftshift: zero frequency in the middle of the map.
        im = ax_map.imshow(np.fft.fftshift(np.asarray(op["sigma_max_map"])), cmap="viridis")
        fig.colorbar(im, ax=ax_map)
        ax_map.set(title=f"{net}.{name}: sigma_max(f), n={op['n']}\nmax {op['sigma_max']:.3g}"
                   + ("" if op["exact"] else " (approx.)"), xlabel="f_x", ylabel="f_y")
    return _save(fig, path)


def plot_output_spectrum(report: dict, path: str | Path) -> Path:
    """Radial power spectra of real and generated images, log scale; the discrepancy in the title."""
    fig, ax = plt.subplots(figsize=(6, 4))
    r = np.arange(1, len(report["power_real"]) + 1)
    ax.plot(r, report["power_real"], label=f"real ({report['num_real']})")
    ax.plot(r, report["power_fake"], label=f"generated ({report['num_fake']})")
    ax.set(yscale="log", xlabel="radius (frequency bin)", ylabel="power",
           title=f"radial power spectrum; discrepancy {report['discrepancy']:.3f} decades")
    ax.legend()
    return _save(fig, path)


def plot_eigenvalues(report: dict, path: str | Path) -> Path:
    """Leading eigenvalues of the training step's Jacobian in the complex plane, with the unit circle."""
    fig, ax = plt.subplots(figsize=(5, 5))
    t = np.linspace(0, 2 * np.pi, 256)
    ax.plot(np.cos(t), np.sin(t), color="grey", lw=1, label="|lambda| = 1")
    ev = np.asarray(report["eigenvalues"]).reshape(-1, 2)
    ax.scatter(ev[:, 0], ev[:, 1], color="tab:red", zorder=3, label=f"leading {len(ev)}")
    ax.set(xlabel="Re lambda", ylabel="Im lambda", aspect="equal",
           title=f"Jacobian of one {report['mode']} step: radius {report['radius']:.6g}")
    lim = max(1.1, float(np.abs(ev).max()) * 1.1 if len(ev) else 1.1)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_noise(report: dict, path: str | Path) -> Path:
    """AR coefficients of the high-pass residuals, real next to generated, with +-2 standard errors."""
    real, fake = report["real"], report["fake"]
    keys = list(real["coefficients"])
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(keys) + 2), 4))
    for shift, name, rep in ((-0.2, "real", real), (0.2, "generated", fake)):
        ax.bar(x + shift, [rep["coefficients"][k] for k in keys], width=0.4,
               yerr=[2 * rep["stderr"][k] for k in keys],
               label=f"{name} (explained var. {rep['explained_variance_fraction']:.2f})")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x, [f"({k})" for k in keys], rotation=45)
    ax.set(xlabel="offset (di, dj)", ylabel="AR coefficient", title=f"AR({real['order']}) of {real['highpass']} "
           "high-pass residuals")
    ax.legend()
    return _save(fig, path)


PLOTS = {"weights": plot_weights, "output_spectrum": plot_output_spectrum, "eig": plot_eigenvalues,
         "noise": plot_noise}  # ppl: numbers only

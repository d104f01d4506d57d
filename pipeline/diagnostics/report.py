"""The diagnostics as reports: what `gan-diagnose` and the training callback (pipeline/diagnostics/callback.py) run."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pipeline.diagnostics.dynamics import FixedBatch, dynamics_report
from pipeline.diagnostics.modes import eval_mode
from pipeline.diagnostics.noise import image_ar_report
from pipeline.diagnostics.spectra import radial_power_spectrum, spectral_discrepancy, weight_spectra
from pipeline.metrics.errors import EvalError

WHAT = ("weights", "output_spectrum", "eig", "ppl", "noise")
DEFAULT_WHAT = ("weights", "output_spectrum", "eig", "noise")  # ppl needs a feature network


def parse_what(spec: str | Sequence[str], *, arg: str = "--what") -> list[str]:
    names = [w.strip() for w in spec.split(",")] if isinstance(spec, str) else [str(w) for w in spec]
    bad = [w for w in names if w not in WHAT]
    if bad or not names:
        raise EvalError(f"{arg}={','.join(names)}: unknown diagnostic {bad[0] if bad else ''!r}; "
                        f"choose from {','.join(WHAT)}")
    return list(dict.fromkeys(names))


@contextmanager
def eval_no_grad(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for a read-only forward; every module's own training flag is restored."""
    with torch.no_grad(), eval_mode(*modules):
        yield


def conv_input_sizes(model: nn.Module, *inputs: Tensor | None) -> dict[str, int]:
    """Layer name -> the width n of the (n x n) map it sees, from one eval-mode forward with hooks."""
    sizes, handles = {}, []
    for name, module in model.named_modules():
        def hook(_m: nn.Module, args: tuple, name: str = name) -> None:
            if args and isinstance(args[0], Tensor) and args[0].ndim == 4:
                sizes.setdefault(name, args[0].shape[-1])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with eval_no_grad(model):
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return sizes


def weights_report(G: nn.Module, D: nn.Module, *, operator: bool = True) -> dict[str, dict]:
    """{"G": weight_spectra(G), "D": ...}; with operator=True also each conv's spectrum on its own map size."""
    device = next(G.parameters()).device
    z = torch.zeros(1, G.z_dim, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if G.num_classes > 0 else None
    sizes_g = conv_input_sizes(G, z, y) if operator else None
    with eval_no_grad(G):
        x = G(z, y)
    sizes_d = conv_input_sizes(D, x, y) if operator else None
    return {"G": weight_spectra(G, feature_size=sizes_g), "D": weight_spectra(D, feature_size=sizes_d)}


def output_spectrum_report(fake: Tensor, real: Tensor) -> dict:
    """Radial power spectra (periodogram) of both sets and their mean |log10| gap in decades."""
    return {"discrepancy": spectral_discrepancy(fake, real), "num_fake": len(fake), "num_real": len(real),
            "power_real": radial_power_spectrum(real).tolist(), "power_fake": radial_power_spectrum(fake).tolist()}


def noise_report(fake: Tensor, real: Tensor, *, order: int = 1) -> dict:
    real_r, fake_r = image_ar_report(real, order=order), image_ar_report(fake, order=order)
    return {"real": real_r, "fake": fake_r,
            "explained_variance_gap": fake_r["explained_variance_fraction"] - real_r["explained_variance_fraction"]}


def eig_report(G: nn.Module, D: nn.Module, batch: FixedBatch, *, d_loss: Callable, g_loss: Callable, lr_g: float,
               lr_d: float, r1_gamma: float, iters: int, k: int = 6, seed: int = 0) -> dict:
    """Leading eigenvalues of one alternating (D then G) gradient step's Jacobian, as GAN.training_step orders them."""
    with torch.enable_grad():
        return dynamics_report(G, D, batch, g_loss=g_loss, d_loss=d_loss, lr_g=lr_g, lr_d=lr_d, r1_gamma=r1_gamma,
                               mode="alternating", k=k, iters=iters, seed=seed)


def fixed_labels(G: nn.Module, n: int, device: torch.device | str) -> Tensor | None:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often; None for an unconditional G."""
    return torch.arange(n, device=device) % G.num_classes if G.num_classes > 0 else None


def generate(G: nn.Module, n: int, *, batch_size: int, seed: int, device: torch.device | str) -> Tensor:
    """n images of G at latents from their own seeded generator, in eval mode: (n, C, H, W) on CPU."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.z_dim, generator=gen)
    y = fixed_labels(G, n, "cpu")
    out = []
    with eval_no_grad(G):
        for i in range(0, n, batch_size):
            yi = None if y is None else y[i:i + batch_size].to(device)
            out.append(G(z[i:i + batch_size].to(device), yi).float().cpu())
    return torch.cat(out)


def scalars(reports: dict[str, dict]) -> dict[str, float]:
    """The headline numbers of each report, under diag/ (what the training callback logs)."""
    out: dict[str, float] = {}
    if "weights" in reports:
        for net, layers in reports["weights"].items():
            out[f"diag/sigma_max/{net}"] = max(layer["sigma_max"] for layer in layers.values())
            ops = [layer["operator"]["sigma_max"] for layer in layers.values() if "operator" in layer]
            if ops:
                out[f"diag/operator_sigma_max/{net}"] = max(ops)
    if "output_spectrum" in reports:
        out["diag/spectral_discrepancy"] = reports["output_spectrum"]["discrepancy"]
    if "eig" in reports:
        out["diag/eig_radius"] = reports["eig"]["radius"]
    if "noise" in reports:
        out["diag/noise/explained_variance_fake"] = reports["noise"]["fake"]["explained_variance_fraction"]
        out["diag/noise/explained_variance_real"] = reports["noise"]["real"]["explained_variance_fraction"]
    for space, rep in reports.get("ppl", {}).items():
        out[f"diag/ppl_{space}"] = rep["mean"]
    return out

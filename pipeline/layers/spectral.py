"""Weight initialisation and spectral normalisation (Miyato et al. 2018) for conv/linear/embedding layers."""

from dataclasses import dataclass

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

INIT_SCHEMES = ("ortho", "N02", "xavier")

# Layers whose `weight` is a matrix (after flattening the kernel) that init and SN act on.
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


def sn(module: nn.Module, *, n_power_iterations: int, eps: float) -> nn.Module:
    """Spectrally normalise `module.weight`; n_power_iterations == 0 turns SN off."""
    if n_power_iterations < 0:
        raise ValueError(f"n_power_iterations must be >= 0 (0 = SN off), got {n_power_iterations}")
    if n_power_iterations == 0:
        return module
    # torch's parametrization divides W (reshaped to (out, -1)) by its top singular value, estimated
    # by power iteration with a persistent u updated on every training-mode forward (SN-GAN eq. 8).
    return spectral_norm(module, n_power_iterations=n_power_iterations, eps=eps)


def init_weights(module: nn.Module, scheme: str) -> nn.Module:
    """Initialise every conv/linear/embedding weight in `module` in place (call before `sn`)."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    for m in module.modules():
        if not isinstance(m, _WEIGHT_LAYERS):
            continue
        if scheme == "ortho":
            # BigGAN (Brock et al. 2019, sec. 3) initialises every layer orthogonally (Saxe et al. 2014).
            nn.init.orthogonal_(m.weight)
        elif scheme == "N02":
            # N(0, 0.02): DCGAN's init, used by BigGAN-PyTorch's CIFAR script.
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        else:
            nn.init.xavier_uniform_(m.weight)
    return module


@dataclass(frozen=True)
class SNLayers:
    """Builds conv/linear/embedding layers with one init scheme and one spectral-norm setting."""

    n_power_iterations: int = 1
    eps: float = 1e-6
    init: str = "ortho"

    def __post_init__(self) -> None:
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {self.init!r}")

    def _wrap(self, module: nn.Module) -> nn.Module:
        return sn(init_weights(module, self.init), n_power_iterations=self.n_power_iterations, eps=self.eps)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True) -> nn.Module:
        """Same-padded stride-1 conv."""
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        return self._wrap(conv)

    def linear(self, in_features: int, out_features: int, *, bias: bool = True) -> nn.Module:
        """Fully connected layer."""
        return self._wrap(nn.Linear(in_features, out_features, bias=bias))

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        """Embedding table; SN acts on the (num_embeddings, embedding_dim) matrix as in BigGAN's D."""
        return self._wrap(nn.Embedding(num_embeddings, embedding_dim))

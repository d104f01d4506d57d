"""The fused Winograd tile transforms of `winograd_kernels.c`, built with the system C compiler and loaded with ctypes.

Why by hand: the transforms are bound by memory traffic, and in plain PyTorch each one is a gather copy,
a small GEMM and (for the output) a reassembling copy, three passes over tensors 2.25x the activations.
One C loop per transform reads and writes each tensor once (measured ~2x faster per transform, see
bench/winograd_conv.py). torch.compile could fuse the same loops, but its first compile took 50-120 s per
function and shape here, and it cannot run under R1's double backward anyway. A plain C file with no
PyTorch headers builds in about a second, once per machine, into `$GAN_PIPELINE_CACHE` (default
~/.cache/gan-pipeline); without a compiler, or with GAN_PIPELINE_CONV=winograd-torch, the PyTorch
transforms in winograd.py are used instead (same results to float rounding).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("winograd_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c99"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None  # why the kernels are unavailable, once a build has failed


def cache_dir() -> Path:
    return Path(os.environ.get("GAN_PIPELINE_CACHE", Path.home() / ".cache" / "gan-pipeline"))


def _library_path(compiler: str) -> Path:
    # -march=native: the build is for this machine's CPU, so the CPU model is part of the key.
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join([compiler, *_FLAGS, platform.machine(),
                                                          platform.processor(), _cpu_model()]).encode())
    return cache_dir() / "kernels" / f"winograd_{key.hexdigest()[:16]}.so"


def _cpu_model() -> str:
    """The first CPU's model name and feature flags (VMs can share a model name across ISAs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))


def _build(target: Path, compiler: str) -> None:
    """Compile into a temporary file and rename it into place, so that ranks building at once never load a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _failed is not None:
            return _lib
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")  # (CC: one executable path)
        if compiler is None:
            _failed = "no C compiler (gcc or $CC) found"
        else:
            path = _library_path(compiler)
            try:
                if not path.exists():
                    _build(path, compiler)
                lib = ctypes.CDLL(str(path))
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                for name in ("winograd_input", "winograd_output_adjoint"):
                    getattr(lib, name).argtypes = [ptr] + [i64] * 8 + [ptr, ctypes.c_int]
                lib.winograd_output.argtypes = [ptr] + [i64] * 4 + [ptr] + [i64] * 4 + [ctypes.c_int]
                _lib = lib
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", "") or str(e)
                _failed = f"building {_SOURCE.name} with {compiler} failed: {detail.strip()[:500]}"
        if _failed:
            warnings.warn(f"Winograd falls back to its PyTorch transforms (slower): {_failed}", stacklevel=3)
    return _lib


def available() -> bool:
    """Whether the native transforms are built and loaded (builds them on first call)."""
    return _load() is not None


def _supported(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4


def _to_tiles(kernel: str, x: Tensor) -> Tensor | None:
    lib = _load() if _supported(x) else None
    if lib is None:
        return None
    n, c, h, w = x.shape
    v = x.new_empty(36, n * (-(-h // 4)) * (-(-w // 4)), c)
    getattr(lib, kernel)(x.data_ptr(), n, c, h, w, *x.stride(), v.data_ptr(), torch.get_num_threads())
    return v


def input_transform(x: Tensor) -> Tensor | None:
    """B^T d B of every 6x6 tile of x (N, C, H, W), any strides -> (36, tiles, C); None if not available."""
    return _to_tiles("winograd_input", x)


def output_transform(m: Tensor, n: int, h: int, w: int, channels_last: bool) -> Tensor | None:
    """A^T m A of every tile: m (36, tiles, K) -> (N, K, H, W) in NCHW or NHWC memory; None if not available."""
    lib = _load() if m.device.type == "cpu" and m.dtype == torch.float32 else None
    if lib is None:
        return None
    m = m.contiguous()
    k = m.shape[2]
    y = torch.empty(n, k, h, w, dtype=m.dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    lib.winograd_output(m.data_ptr(), n, k, h, w, y.data_ptr(), *y.stride(), torch.get_num_threads())
    return y


def output_transform_adjoint(dy: Tensor) -> Tensor | None:
    """The transpose of `output_transform`: dy (N, K, H, W), any strides -> (36, tiles, K); None if not available."""
    return _to_tiles("winograd_output_adjoint", dy)

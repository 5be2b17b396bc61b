"""EDM sampling (Karras et al. 2022, deterministic Heun sampler) from a class head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .diffusion import to_pixel_space
from .nets import Denoiser


@dataclass(frozen=True)
class SampleStep:
    """The sampler state after ``step`` of ``total_steps`` steps."""

    step: int
    total_steps: int
    sigma: float
    image: np.ndarray  # (N, C, H, W) current denoised estimate in [0, 1]


def sample_filename(label: int | None, index: int) -> str:
    """The file name of one sample, ``LABEL-INDEX.png`` (``3-007.png``; ``uncond-000.png``
    for unconditional samples), as ``rdc sample --out-dir`` writes and the app's gallery reads."""
    return f"{'uncond' if label is None else int(label)}-{index:03d}.png"


def parse_sample_filename(stem: str) -> tuple[int, int] | None:
    """``(label, index)`` of a sample file's stem (``"3-007"`` -> ``(3, 7)``), or None when the
    name does not follow :func:`sample_filename` for a class-conditional sample."""
    label, _, index = stem.partition("-")
    if label.isdigit() and index.isdigit():
        return int(label), int(index)
    return None


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The EDM time discretisation, descending, with a final 0."""
    i = torch.arange(steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(1, steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def sample(net: Denoiser, label: int | None, n: int = 1, steps: int = 18, seed: int = 0,
           cancelled: Callable[[], bool] = lambda: False) -> Iterator[SampleStep]:
    """Draw ``n`` images of class ``label`` (None: unconditional head) with Heun's method.

    Yields one record per step; the last record's ``image`` is the sample in [0, 1].
    """
    cfg = net.config
    head = cfg.num_classes if label is None else int(label)
    if not 0 <= head <= cfg.num_classes:
        raise ValueError(f"label must be in 0..{cfg.num_classes - 1} or None")
    gen = torch.Generator().manual_seed(seed)
    sigmas = karras_sigmas(steps)
    device = next(net.parameters()).device
    x = (torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen) * sigmas[0]).to(device)

    def denoise(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return net.denoise(z, s.to(device).expand(n), heads=[head])[:, 0]

    with torch.no_grad():
        for i in range(steps):
            if cancelled():
                return
            s, s_next = sigmas[i], sigmas[i + 1]
            d_cur = denoise(x, s)
            slope = (x - d_cur) / s
            x_next = x + (s_next - s) * slope
            if s_next > 0:
                d_next = denoise(x_next, s_next)
                x_next = x + (s_next - s) * 0.5 * (slope + (x_next - d_next) / s_next)
                estimate = d_next
            else:
                estimate = x_next
            x = x_next
            yield SampleStep(i + 1, steps, float(s_next),
                             to_pixel_space(estimate).clamp(0, 1).cpu().numpy().copy())

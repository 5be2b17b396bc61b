"""EDM sampling (Karras et al. 2022): Heun's method from a class head, deterministic or
with EDM's stochastic "churn" (their Algorithm 2)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .choices import SAMPLER_CHURN_RANGE
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


def is_sample_filename(name: str) -> bool:
    """Whether ``name`` is one :func:`sample_filename` writes (a class's or an unconditional sample)."""
    stem, dot, suffix = name.rpartition(".")
    label, _, index = stem.partition("-")
    return dot == "." and suffix == "png" and (label.isdigit() or label == "uncond") and index.isdigit()


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The EDM time discretisation, descending, with a final 0."""
    i = torch.arange(steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + i / max(1, steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


def churn_gamma(churn: float, steps: int) -> float:
    """The relative noise increase per churned step, ``min(churn / steps, sqrt(2) - 1)`` (EDM's gamma)."""
    return min(churn / steps, math.sqrt(2) - 1)


def sample(net: Denoiser, label: int | None, n: int = 1, steps: int = 18, seed: int = 0,
           cancelled: Callable[[], bool] = lambda: False, churn: float = 0.0,
           churn_range: tuple[float, float] = SAMPLER_CHURN_RANGE) -> Iterator[SampleStep]:
    """Draw ``n`` images of class ``label`` (None: unconditional head) with Heun's method.

    Parameters
    ----------
    churn : float
        EDM's S_churn: 0 samples deterministically; above 0, every step whose noise level
        lies in ``churn_range`` first adds fresh noise that raises sigma by the factor
        ``1 + churn_gamma(churn, steps)`` and then integrates from there, which lets the
        sampler correct errors of earlier steps. The added noise comes from the same seeded
        generator, so a seed still gives one sample.
    churn_range : (float, float)
        The noise levels (EDM's S_tmin, S_tmax) at which churn is applied.

    Yields one record per step; the last record's ``image`` is the sample in [0, 1].
    """
    cfg = net.config
    if label is not None and not 0 <= int(label) < cfg.num_classes:  # index num_classes is the null label
        raise ValueError(f"label must be in 0..{cfg.num_classes - 1} or None")
    head = cfg.num_classes if label is None else int(label)
    if churn < 0 or not 0 <= churn_range[0] <= churn_range[1]:
        raise ValueError("need churn >= 0 and 0 <= churn_range[0] <= churn_range[1]")
    gamma = churn_gamma(churn, steps)
    gen = torch.Generator().manual_seed(seed)
    # as EDM's sampler: never below or above the noise levels the network was trained for
    # (an imported VE network's sigma_min is 0.02; native networks have no such bounds)
    sigmas = karras_sigmas(steps, sigma_min=max(0.002, float(getattr(net, "sigma_min", 0.0))),
                           sigma_max=min(80.0, float(getattr(net, "sigma_max", float("inf")))))
    device = next(net.parameters()).device
    x = (torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen) * sigmas[0]).to(device)

    def denoise(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return net.denoise(z, s.to(device).expand(n), heads=[head])[:, 0]

    with torch.no_grad():
        for i in range(steps):
            if cancelled():
                return
            s, s_next = sigmas[i], sigmas[i + 1]
            if gamma > 0 and churn_range[0] <= s <= churn_range[1]:
                s_hat = s * (1 + gamma)
                fresh = torch.randn(x.shape, generator=gen).to(device)
                x = x + (s_hat ** 2 - s ** 2).sqrt() * fresh
                s = s_hat
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

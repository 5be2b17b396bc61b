"""EDM preconditioning, training noise distribution, weightings and noise-level grids.

Pixels live in [0, 1]; networks see ``x~ = 2 x - 1``. All noise levels ``sigma`` are
in x~ units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .choices import GRIDS, WEIGHTINGS

SIGMA_DATA = 0.5
P_MEAN = -1.2
P_STD = 1.2


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """Map pixels in [0, 1] to the network's [-1, 1] range."""
    return x * 2.0 - 1.0


def to_pixel_space(x: torch.Tensor) -> torch.Tensor:
    """Map network-space values in [-1, 1] back to pixels in [0, 1]."""
    return (x + 1.0) * 0.5


@dataclass(frozen=True)
class Preconditioning:
    """EDM preconditioning coefficients for a batch of noise levels."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def precondition(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> Preconditioning:
    """EDM coefficients (Karras et al. 2022, table 1) for noise levels ``sigma``.

    Parameters
    ----------
    sigma : torch.Tensor
        Noise levels of any shape (x~ units, > 0).
    sigma_data : float
        Standard deviation of the data in x~ units.
    """
    s2 = sigma * sigma
    d2 = sigma_data * sigma_data
    return Preconditioning(
        c_skip=d2 / (s2 + d2),
        c_out=sigma * sigma_data / torch.sqrt(s2 + d2),
        c_in=1.0 / torch.sqrt(s2 + d2),
        c_noise=torch.log(sigma) / 4.0,
    )


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma * sigma + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_training_sigmas(
    n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    p_mean: float = P_MEAN, p_std: float = P_STD,
) -> torch.Tensor:
    """Draw ``n`` training noise levels with ln sigma ~ N(p_mean, p_std^2) (EDM's by default)."""
    z = torch.randn(n, generator=generator, device="cpu")
    return torch.exp(p_mean + p_std * z).to(device)


def log_normal_density(log_sigma: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """Log density of the training distribution of ln sigma, N(p_mean, p_std^2)."""
    return -((log_sigma - p_mean) ** 2) / (2.0 * p_std**2) - math.log(p_std * math.sqrt(2.0 * math.pi))


def log_weight_density(log_sigma: np.ndarray, weighting: str) -> np.ndarray:
    """Log of the weighting density per unit ln(sigma), up to no constant.

    ``elbo``: w(s) = s^-3 per unit s, i.e. s^-2 per unit ln s (uniform in log-SNR for the
    noise-prediction error).
    ``edm``: lambda(s) times EDM's default log-normal training density of ln s,
    N(ln s; P_MEAN, P_STD^2) (correctly divided by P_STD^2); a model trained with other
    ``--p-mean``/``--p-std`` still gets EDM's defaults here.
    """
    if weighting == "elbo":
        return -2.0 * log_sigma
    if weighting == "edm":
        s = np.exp(log_sigma)
        lam = (s * s + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2
        log_normal = -((log_sigma - P_MEAN) ** 2) / (2.0 * P_STD**2) - math.log(
            P_STD * math.sqrt(2.0 * math.pi)
        )
        return np.log(lam) + log_normal
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


@dataclass(frozen=True)
class NoiseGrid:
    """A quadrature grid: noise levels and their weights (sum of weights = total mass)."""

    sigmas: torch.Tensor
    weights: torch.Tensor
    weighting: str
    sigma_min: float
    sigma_max: float

    @property
    def total_mass(self) -> float:
        return float(self.weights.sum())


def _check_grid(steps: int, sigma_min: float, sigma_max: float) -> None:
    """Refuse a grid without levels or with an empty or non-positive sigma range."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError("need 0 < sigma_min < sigma_max")


def quantile_grid(
    steps: int, weighting: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
    resolution: int = 20001,
) -> NoiseGrid:
    """Equal-mass quantile grid of ``steps`` noise levels for a weighting.

    The i-th level is the (i + 0.5) / steps quantile of the weighting restricted to
    [sigma_min, sigma_max]; every level carries the weight total_mass / steps, so the
    weighted integral becomes a plain average.

    Parameters
    ----------
    steps : int
        Number of noise levels T (>= 1).
    weighting : {"elbo", "edm"}
    sigma_min, sigma_max : float
        Integration range in x~ units.
    """
    _check_grid(steps, sigma_min, sigma_max)
    u = np.linspace(math.log(sigma_min), math.log(sigma_max), resolution)
    logw = log_weight_density(u, weighting)
    shift = logw.max()
    w = np.exp(logw - shift)
    du = u[1] - u[0]
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * du)])
    mass = cdf[-1] * math.exp(shift)
    cdf = cdf / cdf[-1]
    q = (np.arange(steps) + 0.5) / steps
    log_s = np.interp(q, cdf, u)
    sigmas = torch.tensor(np.exp(log_s), dtype=torch.float32)
    weights = torch.full((steps,), mass / steps, dtype=torch.float64)
    return NoiseGrid(sigmas, weights, weighting, sigma_min, sigma_max)


def weight_density(sigma: np.ndarray, weighting: str) -> np.ndarray:
    """The weighting's density per unit sigma (not per unit ln sigma), w(s) = exp(log w(ln s)) / s."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return np.exp(log_weight_density(np.log(sigma), weighting)) / sigma


def uniform_grid(steps: int, weighting: str = "edm", sigma_min: float = 1e-4, sigma_max: float = 3.0) -> NoiseGrid:
    """A left Riemann sum over ``steps`` equal intervals of sigma in [sigma_min, sigma_max].

    Level i is the interval's left end, sigma_min + i * d with d = (sigma_max - sigma_min)
    / steps, and carries the weight w(sigma_i) * d, where w is the weighting's density per
    unit sigma (:func:`weight_density`). This is the Euler integral of the released RDC
    code (``EDMEulerIntegralDC`` in huanranchen/DiffusionClassifier, which takes
    ``torch.linspace(1e-4, 3, steps + 1)`` and drops the last point), with the log-normal
    density divided by ``P_STD ** 2`` as it should be (the released code multiplies).

    Parameters
    ----------
    steps : int
        Number of noise levels T (>= 1).
    weighting : {"elbo", "edm"}
    sigma_min, sigma_max : float
        Integration range in x~ units.
    """
    _check_grid(steps, sigma_min, sigma_max)
    d = (sigma_max - sigma_min) / steps
    sigmas = sigma_min + d * np.arange(steps, dtype=np.float64)
    weights = weight_density(sigmas, weighting) * d
    return NoiseGrid(torch.tensor(sigmas, dtype=torch.float32), torch.tensor(weights, dtype=torch.float64),
                     weighting, sigma_min, sigma_max)


def log_grid(steps: int, weighting: str = "edm", sigma_min: float = 0.1, sigma_max: float = 10.0) -> NoiseGrid:
    """The midpoint rule over ``steps`` equal intervals of ln sigma in [sigma_min, sigma_max].

    Level i is the midpoint of the i-th interval in ln sigma and carries the weight
    w(ln sigma_i) * d, with d the interval's width and w the weighting's density per unit
    ln sigma. Unlike :func:`quantile_grid`, the levels do not crowd where the weighting's
    mass is: the weighted squared error grows with sigma, so the integrand's mass sits at
    larger sigma than the weighting's, and equal-mass levels leave that part unsampled.

    Parameters
    ----------
    steps : int
        Number of noise levels T (>= 1).
    weighting : {"elbo", "edm"}
    sigma_min, sigma_max : float
        Integration range in x~ units.
    """
    _check_grid(steps, sigma_min, sigma_max)
    d = (math.log(sigma_max) - math.log(sigma_min)) / steps
    log_sigmas = math.log(sigma_min) + d * (np.arange(steps, dtype=np.float64) + 0.5)
    weights = np.exp(log_weight_density(log_sigmas, weighting)) * d
    return NoiseGrid(torch.tensor(np.exp(log_sigmas), dtype=torch.float32),
                     torch.tensor(weights, dtype=torch.float64), weighting, sigma_min, sigma_max)


def noise_grid(kind: str, steps: int, weighting: str = "edm", sigma_min: float = 0.002,
               sigma_max: float = 80.0) -> NoiseGrid:
    """The classifier's quadrature grid of a kind: ``quantile`` (:func:`quantile_grid`,
    equal-mass levels, equal weights), ``uniform`` (:func:`uniform_grid`, equally spaced
    levels, density-times-spacing weights) or ``log`` (:func:`log_grid`, levels equally
    spaced in ln sigma, density-times-spacing weights)."""
    if kind == "quantile":
        return quantile_grid(steps, weighting, sigma_min, sigma_max)
    if kind == "uniform":
        return uniform_grid(steps, weighting, sigma_min, sigma_max)
    if kind == "log":
        return log_grid(steps, weighting, sigma_min, sigma_max)
    raise ValueError(f"unknown noise grid {kind!r}; expected one of {GRIDS}")

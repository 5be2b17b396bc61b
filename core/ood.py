"""Out-of-distribution indicator: how likely the diffusion model finds its input.

The score is an upper bound on the input's negative log-likelihood under the model's
unconditional denoiser (head K: the null label), in bits per dimension of 8-bit images.
It is the continuous-time variational bound of a variance-exploding diffusion in x~
units, truncated to [sigma_min, sigma_max]:

    -log p(x~) <= d/2 log(2 pi e sigma_min^2)                      (Gaussian decoder)
                  + int_{sigma_min}^{sigma_max} sigma^-3 E_n ||D(x~ + sigma n; sigma) - x~||^2 dsigma
                  + ||x~||^2 / (2 sigma_max^2)                      (prior N(0, sigma_max^2))

and ``-log P(x) = -log p(x~) + d log(255 / 2)`` turns the density of x~ into the
probability of the 8-bit pixel bins. The integral is taken over ln sigma
(``sigma^-2 ... dln sigma``) at fixed midpoints spaced evenly in ln sigma, each with one
noise image of a frozen bank: the score is a deterministic function of the image.

A reference distribution of the same score on the validation split is stored in the
model card (key :data:`CARD_KEY`, written by ``rdc ood-calibrate``); an input's
percentile among it says how typical the input is, and inputs beyond the
:data:`WARN_HIGH`-th percentile (less likely than almost every validation image) or
below the :data:`WARN_LOW`-th (unusually likely, e.g. a blank image) are flagged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Generator

import numpy as np
import torch

from .choices import real_number, whole_number
from .classifier import network_call_limit
from .diffusion import to_model_space
from .models import LoadedModel
from .nets import Denoiser
from .runtime import active_cancellation, raise_if_cancelled

CARD_KEY = "ood_reference"
REFERENCE_FORMAT = "rdc-studio/ood-reference"
QUANTILE_PROBABILITIES = (0.0, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
                          0.95, 0.975, 0.99, 0.995, 0.999, 1.0)
"""The quantiles of the validation scores a reference stores."""
WARN_LOW = 0.1
WARN_HIGH = 99.9
"""Percentiles (of the validation scores) outside which an input is flagged."""
NO_REFERENCE = "no OOD reference for this model"
LOG_BIN = math.log(255 / 2)
"""log of the 8-bit bins per unit of x~ (x~ = 2x - 1 spans 255 bins over a width of 2)."""


@dataclass(frozen=True)
class OodSettings:
    """Quadrature of the score: ``levels`` noise levels spaced evenly in ln sigma."""

    levels: int = 16
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", whole_number("levels", self.levels, 1, 4096))
        object.__setattr__(self, "noise_seed", whole_number("noise_seed", self.noise_seed, 0, 2**63 - 1))
        for name in ("sigma_min", "sigma_max"):
            object.__setattr__(self, name, real_number(name, getattr(self, name), above=True))
        if not self.sigma_min < self.sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OodSettings":
        if not isinstance(data, dict):
            raise ValueError(f"OOD settings must be an object, not {data!r:.80}")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class OodScore:
    """One input's score and where it falls among the validation scores."""

    bits_per_dim: float
    percentile: float | None  # % of validation images with a lower score; None: no reference
    out_of_distribution: bool | None  # None: no reference
    warning: str | None  # a sentence when out of distribution
    note: str | None = None  # e.g. that the model has no reference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreBatch:
    """The scores of one batch of images (``done`` of ``total`` images scored)."""

    done: int
    total: int
    bits_per_dim: np.ndarray  # (B,)


def log_sigma_grid(settings: OodSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoint rule over ln sigma: the levels (L,) and the weights (L,) of
    ``int sigma^-3 f(sigma) dsigma = int sigma^-2 f(sigma) dln sigma``."""
    lo, hi = math.log(settings.sigma_min), math.log(settings.sigma_max)
    step = (hi - lo) / settings.levels
    log_s = lo + step * (torch.arange(settings.levels, dtype=torch.float64) + 0.5)
    return log_s.exp().float(), (step * torch.exp(-2.0 * log_s)).float()


class OodScorer:
    """Scores images in bits per dimension and places them among a reference.

    Parameters
    ----------
    net : Denoiser
        Any denoiser of the project; its unconditional head (``num_classes``) is used.
    settings : OodSettings
        The quadrature; a reference's own settings take precedence (see :meth:`for_model`).
    reference : dict, optional
        A model card's :data:`CARD_KEY` entry (see :func:`make_reference`).
    """

    def __init__(self, net: Denoiser, settings: OodSettings | None = None,
                 reference: dict[str, Any] | None = None) -> None:
        self.net = net
        self.settings = settings or OodSettings()
        self.reference = reference
        cfg = net.config
        self.sigmas, self.weights = log_sigma_grid(self.settings)
        gen = torch.Generator().manual_seed(self.settings.noise_seed)
        self.noise_bank = torch.randn((self.settings.levels, cfg.in_channels, cfg.image_size, cfg.image_size),
                                      generator=gen)

    @classmethod
    def for_model(cls, model: LoadedModel) -> "OodScorer":
        """The scorer of a loaded model: the unconditional denoiser purification uses (the
        purifier's, when the card names one), and the card's reference (if any) with the
        reference's own settings.

        Raises
        ------
        ValueError
            If the card's reference is malformed.
        """
        reference = model.card.get(CARD_KEY)
        if reference is None:
            return cls(model.purifier_net)
        check_reference(reference)
        return cls(model.purifier_net, OodSettings.from_dict(reference["settings"]), reference)

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor, levels_per_pass: int = 0) -> torch.Tensor:
        """The score of images ``x`` (N, C, H, W) in [0, 1], shaped (N,) (float64).

        ``levels_per_pass`` bounds one network call to N times that many levels (0: as many
        (level, image) inputs as one call takes, :func:`core.classifier.network_call_limit`,
        one by one for a costly network). A stop request
        (:func:`core.runtime.cancellation_scope`) ends it between two calls.
        """
        x0 = to_model_space(x.float())
        n, dims = x0.shape[0], x0[0].numel()
        device = x0.device
        levels = self.settings.levels
        spatial = [1] * (x0.dim() - 1)
        # every (level, image) input, level-major
        sig_rows = self.sigmas.to(device).repeat_interleave(n)
        x_rows = x0.repeat(levels, *spatial)
        noise = self.noise_bank.to(device).repeat_interleave(n, dim=0)
        per_call = levels_per_pass * n if levels_per_pass > 0 else network_call_limit(self.net, device.type)
        cancelled = active_cancellation()
        errors = []
        for start in range(0, levels * n, per_call):
            raise_if_cancelled(cancelled)
            rows = slice(start, start + per_call)
            noisy = x_rows[rows] + sig_rows[rows].view(-1, *spatial) * noise[rows]
            denoised = self.net.denoise(noisy, sig_rows[rows], heads=[self.net.config.num_classes])[:, 0]
            errors.append((denoised - x_rows[rows]).pow(2).flatten(1).sum(1))
        err = torch.cat(errors).view(levels, n).double()
        total = (self.weights.to(device).double().view(-1, 1) * err).sum(0)
        s = self.settings
        decoder = dims * (0.5 * math.log(2 * math.pi * math.e) + math.log(s.sigma_min))
        prior = x0.double().pow(2).flatten(1).sum(1) / (2 * s.sigma_max ** 2)
        nats = total + decoder + prior + dims * LOG_BIN
        return (nats / (dims * math.log(2.0))).cpu()

    def assess(self, x: torch.Tensor) -> list[OodScore]:
        """Score images ``x`` and place each among the reference (if the model has one)."""
        return [judge(float(b), self.reference) for b in self.bits_per_dim(x)]


def check_reference(reference: dict[str, Any]) -> None:
    """Raise ValueError unless ``reference`` is a usable :data:`CARD_KEY` entry."""
    try:
        probs, values = reference["probabilities"], reference["quantiles"]
        OodSettings.from_dict(reference["settings"])
        ok = (len(probs) == len(values) >= 2 and list(probs) == sorted(probs)
              and list(values) == sorted(values) and probs[0] == 0.0 and probs[-1] == 1.0
              and all(math.isfinite(v) for v in values))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model card entry {CARD_KEY!r} is malformed ({exc})") from None
    if not ok:
        raise ValueError(f"model card entry {CARD_KEY!r} is malformed (quantiles must rise from "
                         "probability 0 to 1)")


def percentile(bits_per_dim: float, reference: dict[str, Any]) -> float:
    """The percentage of the reference's validation scores below ``bits_per_dim``.

    Linear between the stored quantiles; 0 below the smallest, 100 above the largest.
    """
    probs = np.asarray(reference["probabilities"], dtype=float) * 100
    values = np.asarray(reference["quantiles"], dtype=float)
    return float(np.interp(bits_per_dim, values, probs, left=0.0, right=100.0))


def judge(bits_per_dim: float, reference: dict[str, Any] | None) -> OodScore:
    """The :class:`OodScore` of a score given a reference (None: say there is none)."""
    if reference is None:
        return OodScore(bits_per_dim, None, None, None, NO_REFERENCE)
    pct = percentile(bits_per_dim, reference)
    split = f"{reference.get('dataset', '')} {reference.get('split', 'val')}".strip()
    warning = None
    if pct > WARN_HIGH:
        warning = (f"out of distribution: {bits_per_dim:.2f} bits/dim is less likely than {WARN_HIGH:g}% of "
                   f"the {split} images")
    elif pct < WARN_LOW:
        warning = (f"out of distribution: {bits_per_dim:.2f} bits/dim is more likely than {100 - WARN_LOW:g}% "
                   f"of the {split} images (a blank or unusually simple input?)")
    return OodScore(bits_per_dim, pct, warning is not None, warning)


def score_images(scorer: OodScorer, images: torch.Tensor, batch_size: int = 50,
                 cancelled: Callable[[], bool] = lambda: False,
                 device: str | torch.device = "cpu") -> Generator[ScoreBatch, None, np.ndarray | None]:
    """Score ``images`` (N, C, H, W; uint8 or floats in [0, 1]) batch by batch.

    Yields a :class:`ScoreBatch` per batch; returns all N scores (None when cancelled).
    """
    total = images.shape[0]
    scores = []
    for start in range(0, total, batch_size):
        if cancelled():
            return None
        batch = images[start:start + batch_size]
        batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        bpd = scorer.bits_per_dim(batch.to(device)).numpy()
        scores.append(bpd)
        yield ScoreBatch(start + len(bpd), total, bpd.copy())
    return np.concatenate(scores) if scores else np.zeros(0)


def make_reference(scores: np.ndarray, settings: OodSettings, dataset: str, split: str,
                   command: str = "", seconds: float | None = None) -> dict[str, Any]:
    """The :data:`CARD_KEY` entry of a model card from the scores of ``len(scores)`` images."""
    scores = np.asarray(scores, dtype=float)
    if scores.size < 2 or not np.isfinite(scores).all():
        raise ValueError("a reference needs at least two finite scores")
    reference = {
        "format": REFERENCE_FORMAT,
        "score": "upper bound on -log2 P(x) per dimension (8-bit pixels), unconditional denoiser",
        "dataset": dataset, "split": split, "n": int(scores.size),
        "settings": settings.to_dict(),
        "probabilities": list(QUANTILE_PROBABILITIES),
        "quantiles": [float(v) for v in np.quantile(scores, QUANTILE_PROBABILITIES)],
        "mean": float(scores.mean()), "std": float(scores.std(ddof=1)),
        "warn_below_percentile": WARN_LOW, "warn_above_percentile": WARN_HIGH,
        "command": command,
    }
    if seconds is not None:
        reference["seconds"] = round(float(seconds), 1)
    return reference


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling ``out_scores`` (positives) from ``in_scores``
    by a higher score (ties count one half): the Mann-Whitney U statistic over n_in n_out."""
    a = np.asarray(in_scores, dtype=float)
    b = np.asarray(out_scores, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("both score sets must be non-empty")
    greater = (b[:, None] > a[None, :]).sum()
    ties = (b[:, None] == a[None, :]).sum()
    return float((greater + 0.5 * ties) / (a.size * b.size))

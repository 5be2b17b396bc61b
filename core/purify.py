"""Likelihood maximisation ("purification"): projected descent of the diffusion loss.

x* = argmin over ||x' - x||_inf <= eta, x' in [0, 1] of
E_{s,n} lambda(s) ||D_unc(x~' + s n; s) - x~'||^2, by N projected steps with one noise
level per step drawn from [sigma_lo, sigma_hi] (x~ units). The l-inf projection onto the
eta ball is part of the method.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .diffusion import loss_weight, to_model_space
from .nets import Denoiser

OPTIMIZERS = ("sign", "adam")
SCORES = ("uncond", "mixture")


@dataclass
class PurifySettings:
    """Likelihood-maximisation settings (eta and step sizes in [0, 1] pixel units)."""

    eta: float = 8 / 255  # the paper's CIFAR-10 setting; MNIST defaults come from the model card
    steps: int = 5
    step_size: float = 2 / 255
    optimizer: str = "sign"
    sigma_lo: float = 0.4
    sigma_hi: float = 0.6
    score: str = "uncond"
    mode: str = "deterministic"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}")
        if self.mode not in ("deterministic", "randomized"):
            raise ValueError("mode must be 'deterministic' or 'randomized'")
        if self.eta < 0 or self.steps < 0 or self.step_size < 0:
            raise ValueError("eta, steps and step_size must be >= 0")
        if not 0 < self.sigma_lo <= self.sigma_hi:
            raise ValueError("need 0 < sigma_lo <= sigma_hi")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PurifyStep:
    """The state after ``step`` of ``total_steps`` likelihood-maximisation steps."""

    step: int
    total_steps: int
    image: np.ndarray  # (N, C, H, W) in [0, 1]
    objective: np.ndarray  # (N,) diffusion loss of the image before this step's update
    sigma: float
    linf: np.ndarray  # (N,) distance to the input
    l2: np.ndarray
    logits: np.ndarray | None = None  # (N, K) if a classifier was given


class LikelihoodMaximizer:
    """Projected likelihood maximisation around a denoiser's unconditional score.

    Randomness comes from an explicit generator: in deterministic mode a frozen bank of
    per-step noise levels and noise images, seeded by ``settings.noise_seed``.
    """

    def __init__(self, net: Denoiser, settings: PurifySettings | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.net = net
        self.settings = settings or PurifySettings()
        cfg = net.config
        self._shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.generator = generator or torch.Generator().manual_seed(self.settings.noise_seed + 7)
        self._bank = self._draw(torch.Generator().manual_seed(self.settings.noise_seed))

    def _draw(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        u = torch.rand(max(1, s.steps), generator=gen, dtype=torch.float64)
        sigmas = (s.sigma_lo + (s.sigma_hi - s.sigma_lo) * u).float()
        noise = torch.randn((max(1, s.steps),) + self._shape, generator=gen)
        return sigmas, noise

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (N,), noises (N, C, H, W)) for one run."""
        if self.settings.mode == "deterministic":
            return self._bank
        return self._draw(self.generator)

    def objective(self, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-example weighted diffusion loss at one noise level (differentiable in x)."""
        x0 = to_model_space(x)
        n = x.shape[0]
        noisy = x0 + sigma.to(x.device) * noise.to(x.device)
        sig = sigma.to(x.device).expand(n)
        k = self.net.config.num_classes
        w = loss_weight(sig)
        if self.settings.score == "uncond":
            d = self.net.denoise(noisy, sig, heads=[k])[:, 0]
            return w * (d - x0).pow(2).flatten(1).sum(1)
        d = self.net.denoise(noisy, sig, heads=range(k))
        err = w.view(-1, 1) * (d - x0.unsqueeze(1)).pow(2).flatten(2).sum(2)
        return -torch.logsumexp(-err, dim=1) + float(np.log(k))

    def run(self, x: torch.Tensor, classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
            cancelled: Callable[[], bool] = lambda: False) -> Iterator[PurifyStep]:
        """Yield one :class:`PurifyStep` per step (step 0 is the input itself).

        ``classifier`` (e.g. a DiffusionClassifier) adds the per-class logits of every
        intermediate image to the records.
        """
        s = self.settings
        sigmas, noises = self.draws()
        x_orig = x.detach()
        cur = x_orig.clone()
        m = torch.zeros_like(cur)
        v = torch.zeros_like(cur)

        def record(step: int, obj: torch.Tensor, sigma: float) -> PurifyStep:
            d = (cur - x_orig).flatten(1)
            logits = None
            if classifier is not None:
                with torch.no_grad():
                    logits = classifier(cur).cpu().numpy().copy()
            return PurifyStep(step, s.steps, cur.cpu().numpy().copy(), obj.detach().cpu().numpy().copy(), sigma,
                              d.abs().amax(1).cpu().numpy().copy(), d.norm(dim=1).cpu().numpy().copy(), logits)

        for i in range(s.steps):
            if cancelled():
                return
            cur.requires_grad_(True)
            with torch.enable_grad():
                obj = self.objective(cur, sigmas[i], noises[i])
                (grad,) = torch.autograd.grad(obj.sum(), cur)
            cur = cur.detach()
            if i == 0:
                yield record(0, obj, float(sigmas[0]))
            cur = self._update(cur, grad, i, m, v)
            cur = torch.minimum(torch.maximum(cur, x_orig - s.eta), x_orig + s.eta).clamp(0.0, 1.0)
            nxt = min(i + 1, s.steps - 1)
            with torch.no_grad():
                obj_next = self.objective(cur, sigmas[nxt], noises[nxt])
            yield record(i + 1, obj_next, float(sigmas[nxt]))

    def _update(self, x: torch.Tensor, grad: torch.Tensor, i: int, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if s.optimizer == "sign":
            return x - s.step_size * grad.sign()
        b1, b2, eps = 0.9, 0.999, 1e-8
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = m / (1 - b1 ** (i + 1))
        v_hat = v / (1 - b2 ** (i + 1))
        return x - s.step_size * m_hat / (v_hat.sqrt() + eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The purified images (no gradient to the input; see the RDC module for that)."""
        last = x.detach().clone()
        for rec in self.run(x):
            last = torch.from_numpy(rec.image)
        return last.to(x.device)

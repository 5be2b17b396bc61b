"""Likelihood maximisation ("purification"): projected descent of the diffusion loss.

x* = argmin over ||x' - x||_inf <= eta, x' in [0, 1] of
E_{s,n} lambda(s) ||D_unc(x~' + s n; s) - x~'||^2, by N projected steps with one noise
level per step drawn from [sigma_lo, sigma_hi] (x~ units). The l-inf projection onto the
eta ball is part of the method.

Every step's own noise draw makes its objective value noisy from step to step; the step
records therefore also carry a deterministic estimate of the objective (the same
objective averaged over a frozen bank of fixed noise levels and noises, the same at every
step), so the curve of a run shows what the optimisation actually achieves.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from .choices import real_number, whole_number
from .classifier import labels_are_inputs, network_call_limit
from .diffusion import loss_weight, to_model_space
from .nets import Denoiser
from .runtime import active_cancellation, raise_if_cancelled

OPTIMIZERS = ("sign", "adam")
SCORES = ("uncond", "mixture")
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ESTIMATE_LEVELS = 8
"""Fixed noise levels of the deterministic objective estimate recorded with every step."""
ESTIMATE_SEED_OFFSET = 13
"""The estimate's noise bank is seeded by ``noise_seed + ESTIMATE_SEED_OFFSET`` (apart
from the steps' own draws)."""


def project_eta(x: torch.Tensor, x_orig: torch.Tensor, eta: float) -> torch.Tensor:
    """Project onto the l-inf ball of radius ``eta`` around ``x_orig`` and the [0, 1] box."""
    return torch.minimum(torch.maximum(x, x_orig - eta), x_orig + eta).clamp(0.0, 1.0)


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
    # sign steps with momentum (the RDC paper's Algorithm 1, MI-FGSM style): the step's sign
    # is that of m <- momentum * m + g / ||g||_1; 0 = plain sign steps (the same as sign(g))
    momentum: float = 0.0
    preset: str = ""  # the named preset (core.presets) these settings started from; "" = none

    def __post_init__(self) -> None:
        self.momentum = real_number("momentum", self.momentum, 0)
        self.eta = real_number("eta", self.eta, 0)
        self.step_size = real_number("step_size", self.step_size, 0)
        self.steps = whole_number("steps", self.steps, 0, 100_000)
        self.noise_seed = whole_number("noise_seed", self.noise_seed, 0, 2**63 - 1)
        self.sigma_lo = real_number("sigma_lo", self.sigma_lo, above=True)
        self.sigma_hi = real_number("sigma_hi", self.sigma_hi, above=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}")
        if self.mode not in ("deterministic", "randomized"):
            raise ValueError("mode must be 'deterministic' or 'randomized'")
        if self.eta > 1 or self.step_size > 1:  # most likely grey levels meant as 8/255
            value = max(self.eta, self.step_size)
            raise ValueError(f"eta and step_size are l-inf distances in [0, 1] pixel units, not {value:g}; "
                             f"write grey levels as a fraction, e.g. {value:g}/255")
        if not self.sigma_lo <= self.sigma_hi:
            raise ValueError(f"need sigma_lo <= sigma_hi, not {self.sigma_lo:g} > {self.sigma_hi:g}")

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
    # (N,) the objective of the image on the frozen estimate bank (comparable between steps)
    objective_estimate: np.ndarray | None = None


class LikelihoodMaximizer:
    """Projected likelihood maximisation around a denoiser's unconditional score.

    Randomness comes from an explicit generator: in deterministic mode a frozen bank of
    per-step noise levels and noise images, seeded by ``settings.noise_seed``. A second
    frozen bank (:attr:`estimate_bank`, in either mode) gives the deterministic objective
    estimate the step records carry.
    """

    def __init__(self, net: Denoiser, settings: PurifySettings | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.net = net
        self.settings = settings or PurifySettings()
        cfg = net.config
        self._shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.generator = generator or torch.Generator().manual_seed(self.settings.noise_seed + 7)
        self._bank = self._draw(torch.Generator().manual_seed(self.settings.noise_seed))
        self.estimate_bank = self._estimate_bank(ESTIMATE_LEVELS)

    def _draw(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        u = torch.rand(max(1, s.steps), generator=gen, dtype=torch.float64)
        sigmas = (s.sigma_lo + (s.sigma_hi - s.sigma_lo) * u).float()
        noise = torch.randn((max(1, s.steps),) + self._shape, generator=gen)
        return sigmas, noise

    def _estimate_bank(self, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``levels`` fixed noise levels (the midpoints of ``levels`` equal parts of
        [sigma_lo, sigma_hi]) and one fixed noise image per level, for any mode."""
        s = self.settings
        mid = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
        sigmas = (s.sigma_lo + (s.sigma_hi - s.sigma_lo) * mid).float()
        gen = torch.Generator().manual_seed(s.noise_seed + ESTIMATE_SEED_OFFSET)
        return sigmas, torch.randn((levels,) + self._shape, generator=gen)

    def draws(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas (N,), noises (N, C, H, W)) for one run."""
        if self.settings.mode == "deterministic":
            return self._bank
        return self._draw(self.generator)

    def objective(self, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-example weighted diffusion loss (differentiable in x).

        ``sigma`` is one noise level (a scalar tensor) or one per example (N,); ``noise``
        one image (C, H, W) for every example or one per example (N, C, H, W).
        """
        x0 = to_model_space(x)
        n = x.shape[0]
        sig = sigma.to(x.device).reshape(-1).expand(n)
        noisy = x0 + sig.view(-1, *[1] * (x.dim() - 1)) * noise.to(x.device)
        k = self.net.config.num_classes
        w = loss_weight(sig)
        if self.settings.score == "uncond":
            d = self.net.denoise(noisy, sig, heads=[k])[:, 0]
            return w * (d - x0).pow(2).flatten(1).sum(1)
        d = self.net.denoise(noisy, sig, heads=range(k))
        err = w.view(-1, 1) * (d - x0.unsqueeze(1)).pow(2).flatten(2).sum(2)
        return -torch.logsumexp(-err, dim=1) + float(np.log(k))

    def objective_estimate(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic estimate of the objective of ``x``, shaped (N,).

        The mean of :meth:`objective` over :attr:`estimate_bank` (fixed levels spread over
        [sigma_lo, sigma_hi], one fixed noise image each), all levels in one batched pass.
        It does not depend on the steps' noise draws, so its values at different steps
        of a run (or of different runs) are comparable.
        """
        sigmas, noises = self.estimate_bank
        n, levels = x.shape[0], sigmas.shape[0]
        # as many levels per pass as one network call takes (one by one for a costly network),
        # polling the active cancellation scope between passes
        per_row = self.net.config.num_classes if self.settings.score != "uncond" and labels_are_inputs(self.net) else 1
        chunk = max(1, network_call_limit(self.net, x.device.type) // (n * per_row))
        cancelled = active_cancellation()
        parts = []
        with torch.no_grad():
            for start in range(0, levels, chunk):
                raise_if_cancelled(cancelled)
                m = min(chunk, levels - start)
                parts.append(self.objective(x.detach().repeat(m, *[1] * (x.dim() - 1)),
                                            sigmas[start:start + m].repeat_interleave(n),
                                            noises[start:start + m].repeat_interleave(n, dim=0)))
        return torch.cat(parts).view(levels, n).mean(0)

    def run(self, x: torch.Tensor, classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
            cancelled: Callable[[], bool] = lambda: False, estimate: bool = True) -> Iterator[PurifyStep]:
        """Yield one :class:`PurifyStep` per step (step 0 is the input itself; nothing at all
        when the settings take 0 steps).

        ``classifier`` (e.g. a DiffusionClassifier) adds the per-class logits of every
        intermediate image to the records; ``estimate`` adds the deterministic objective
        estimate (:meth:`objective_estimate`) of every intermediate image.
        """
        s = self.settings
        sigmas, noises = self.draws()
        x_orig = x.detach()
        cur = x_orig.clone()
        moments = None

        def record(step: int, obj: torch.Tensor, sigma: float) -> PurifyStep:
            d = (cur - x_orig).flatten(1)
            logits = None
            if classifier is not None:
                with torch.no_grad():
                    logits = classifier(cur).cpu().numpy().copy()
            fixed = self.objective_estimate(cur).cpu().numpy().copy() if estimate else None
            return PurifyStep(step, s.steps, cur.cpu().numpy().copy(), obj.detach().cpu().numpy().copy(), sigma,
                              d.abs().amax(1).cpu().numpy().copy(), d.norm(dim=1).cpu().numpy().copy(), logits,
                              fixed)

        for i in range(s.steps):
            if cancelled():
                return
            nxt, obj, moments = self.step(cur, x_orig, i, sigmas[i], noises[i], moments)
            if i == 0:
                yield record(0, obj, float(sigmas[0]))
            cur = nxt
            after = min(i + 1, s.steps - 1)
            with torch.no_grad():
                obj_next = self.objective(cur, sigmas[after], noises[after])
            yield record(i + 1, obj_next, float(sigmas[after]))

    def step(self, x: torch.Tensor, x_orig: torch.Tensor, i: int, sigma: torch.Tensor, noise: torch.Tensor,
             moments: tuple[torch.Tensor, torch.Tensor] | None = None, create_graph: bool = False,
             smooth_sign: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Likelihood-maximisation step ``i`` (0-based) of ``x`` at one noise level.

        The one implementation of a step, shared by :meth:`run` and the RDC module.

        Parameters
        ----------
        x_orig
            The input: steps are projected onto its ``eta`` ball and [0, 1].
        moments
            Adam's (first, second) moments from the previous step, or the sign steps'
            momentum buffer (both slots) when ``settings.momentum`` > 0 (None at the start).
        create_graph
            Keep the graph, so the result is differentiable in ``x`` (second order).
        smooth_sign
            With ``create_graph``: back-propagate sign steps through ``tanh(g / tau)``
            (``tau``: the example's mean ``|g|``); the values are those of the sign steps.

        Returns
        -------
        tuple
            (the next iterate, the per-example objective at ``x`` (detached), the moments).
        """
        s = self.settings
        if not create_graph:
            x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            obj = self.objective(x, sigma, noise)
            (grad,) = torch.autograd.grad(obj.sum(), x, create_graph=create_graph)
        if not create_graph:
            x = x.detach()
        if s.optimizer == "sign":
            g = grad
            if s.momentum > 0:  # m <- mu m + g / ||g||_1 per example; the step follows sign(m)
                l1 = grad.abs().flatten(1).sum(1).clamp_min(1e-30).view(-1, *[1] * (grad.dim() - 1))
                g = grad / l1 + (s.momentum * moments[0] if moments is not None else 0.0)
                moments = (g, g)
            direction = g.sign()
            if smooth_sign and create_graph:
                tau = g.detach().abs().flatten(1).mean(1).clamp_min(1e-12).view(-1, *[1] * (g.dim() - 1))
                surrogate = torch.tanh(g / tau)
                direction = direction.detach() + (surrogate - surrogate.detach())
        else:
            b1, b2 = ADAM_BETAS
            m, v = moments if moments is not None else (torch.zeros_like(grad), torch.zeros_like(grad))
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            direction = (m / (1 - b1 ** (i + 1))) / ((v / (1 - b2 ** (i + 1))).sqrt() + ADAM_EPS)
            moments = (m, v)
        return project_eta(x - s.step_size * direction, x_orig, s.eta), obj.detach(), moments

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The purified images (no gradient to the input; see the RDC module for that)."""
        last = x.detach().clone()
        for rec in self.run(x, estimate=False):
            last = torch.from_numpy(rec.image)
        return last.to(x.device)

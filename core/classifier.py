"""The diffusion classifier: per-class logits from the weighted denoising ELBO.

logit_y(x) = -sum_i w_i ||D_y(x~ + s_i n_i; s_i) - x~||^2 (+ log p(y)), with the same
noise n_i for every class. With the multi-head network one forward pass gives all K
classes; the class-embedding network runs the K classes as one batched pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, asdict
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from .choices import real_number, whole_number
from .data import check_image_batch
from .diffusion import GRIDS, WEIGHTINGS, NoiseGrid, noise_grid, to_model_space
from .nets import Denoiser
from .runtime import active_cancellation, raise_if_cancelled

MODES = ("deterministic", "randomized")
REDUCTIONS = ("sum", "mean")
# Network inputs (image, level, class) per network call, by device type. A DC pass on N
# images is N x levels x classes inputs (80 per image at the shipped settings).
# Without autograd, a large batch runs in calls small enough for the CPU's caches: 50
# digits at once took 201 ms per digit on the 2-core VM, in calls of 512 inputs 124 ms,
# of 160 114 ms (docs/architecture.md). With autograd, calls of 64 inputs cost nothing
# against larger ones (an RDC attack step at T = 256: 1979 ms against 2186 ms in calls of
# 512; benchmarks/bench_attack_step.py --call-inputs) and each is a point where a stop
# request can end the pass (core.runtime.cancellation_scope). A gradient pass keeps
# every input's activations (about 4.6 MB each for the 28x28 class-embedding U-Net;
# unbounded, a batch of 50 needs ~19 GB): above MAX_GRADIENT_INPUTS it runs in
# checkpointed segments of that size, so the backward pass holds one segment's
# activations at a time (for one more forward pass).
MAX_NETWORK_INPUTS = {"cpu": 160, "cuda": 4096}
MAX_GRADIENT_CALL_INPUTS = {"cpu": 64, "cuda": 4096}
MAX_GRADIENT_INPUTS = {"cpu": 512, "cuda": 4096}
# The limits above are for a network as costly per input as the shipped 28x28
# class-embedding U-Net (its multiply-adds, by count_macs_per_input). A network c times
# as costly gets 1/c of each limit (at least one input), so that its calls last about as
# long (a stop request still ends a pass within a fraction of a second on a CPU: one input
# of EDM's CIFAR-10 network takes ~0.35 s there, 160 of them ~50 s) and hold about as
# much activation memory. Only the CUDA limit without autograd stays as it is (throughput).
REFERENCE_MACS_PER_INPUT = 116_814_848


@dataclass
class ClassifierSettings:
    """Quadrature and randomness settings of the diffusion classifier."""

    steps: int = 16
    weighting: str = "edm"
    sigma_min: float = 0.1
    sigma_max: float = 10.0
    mode: str = "deterministic"
    noise_seed: int = 0
    levels_per_pass: int = 0  # noise levels per forward pass (0 = all); bounds memory
    bf16: bool = False
    # Progressive class elimination: the first ``screen_levels`` levels (a stratified
    # subset of the grid) are spent on all K classes, the rest on the ``keep_classes``
    # classes leading after them. 0 = every level on every class.
    screen_levels: int = 0
    keep_classes: int = 0
    # The quadrature: ``quantile`` (equal-mass levels of the weighting, equal weights),
    # ``log`` (equally spaced in ln sigma, weights = density x spacing; the bundled default
    # model's) or ``uniform`` (equally spaced sigmas, weights = density x spacing; the released
    # RDC code's Euler integral). ``reduction``: the squared error summed over pixels (``sum``)
    # or averaged over them (``mean``, as the released code does: logits 1/(C H W) as large).
    grid: str = "quantile"
    reduction: str = "sum"
    preset: str = ""  # the named preset (core.presets) these settings started from; "" = none

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        for name, lo, hi in (("steps", 1, 4096), ("noise_seed", 0, 2**63 - 1), ("levels_per_pass", 0, 4096),
                             ("screen_levels", 0, 4096), ("keep_classes", 0, 1000)):
            setattr(self, name, whole_number(name, getattr(self, name), lo, hi))
        for name in ("sigma_min", "sigma_max"):
            setattr(self, name, real_number(name, getattr(self, name), above=True))
        if not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be true or false, not {self.bf16!r}")
        if self.screen_levels > self.steps:
            raise ValueError(f"screen_levels ({self.screen_levels}) exceeds the number of levels ({self.steps}); "
                             f"screen fewer levels (--screen-levels; 0 turns class elimination off)")

    @property
    def eliminates(self) -> bool:
        """Whether some levels are evaluated on the leading classes only."""
        return 0 < self.screen_levels < self.steps and self.keep_classes > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierSettings":
        if not isinstance(data, dict):
            raise ValueError(f"classifier settings must be an object, not {data!r:.80}")
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ClassifyStep:
    """Running per-class estimate after ``levels_done`` of ``total_levels`` noise levels."""

    levels_done: int
    total_levels: int
    sigmas_done: np.ndarray
    logits: np.ndarray  # (N, K) estimate of the full weighted sum so far
    probabilities: np.ndarray  # (N, K)
    level_errors: np.ndarray  # (N, L, K) errors of the levels of this chunk


class DiffusionClassifier(nn.Module):
    """Per-class likelihood classifier around a :class:`~core.nets.Denoiser`.

    Parameters
    ----------
    net : Denoiser
        Multi-head or class-embedding denoiser.
    settings : ClassifierSettings
        Grid (steps, weighting, sigma range), randomness mode and precision.
    log_prior : optional (K,) tensor added to the logits.
    generator : torch.Generator used in randomized mode (default: seeded from
        ``settings.noise_seed``).
    max_network_inputs : the most network inputs in one call, with or without autograd
        (default: by device, :data:`MAX_NETWORK_INPUTS` and :data:`MAX_GRADIENT_INPUTS`);
        bounds memory, never changes which inputs are run.
    """

    def __init__(self, net: Denoiser, settings: ClassifierSettings | None = None,
                 log_prior: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 max_network_inputs: int | None = None) -> None:
        super().__init__()
        self.net = net
        if max_network_inputs is not None and max_network_inputs < 1:
            raise ValueError(f"max_network_inputs must be at least 1, got {max_network_inputs}")
        self.max_network_inputs = max_network_inputs
        self.settings = settings or ClassifierSettings()
        self.num_classes = net.config.num_classes
        self.grid: NoiseGrid = noise_grid(self.settings.grid, self.settings.steps, self.settings.weighting,
                                          self.settings.sigma_min, self.settings.sigma_max)
        shape = (self.settings.steps, net.config.in_channels, net.config.image_size, net.config.image_size)
        bank_gen = torch.Generator().manual_seed(self.settings.noise_seed)
        self.register_buffer("noise_bank", torch.randn(shape, generator=bank_gen), persistent=False)
        self.register_buffer("sigmas", self.grid.sigmas.clone(), persistent=False)
        # per-pixel mean: the same weighted sum, 1/(C H W) as large
        scale = 1.0 / float(np.prod(shape[1:])) if self.settings.reduction == "mean" else 1.0
        self.register_buffer("weights", (self.grid.weights * scale).float().clone(), persistent=False)
        self.register_buffer("log_prior", log_prior if log_prior is not None else torch.zeros(self.num_classes),
                             persistent=False)
        self.generator = generator or torch.Generator().manual_seed(self.settings.noise_seed + 1)

    @property
    def device(self) -> torch.device:
        return self.noise_bank.device

    def draw_noise(self) -> torch.Tensor:
        """The noise for one call: the frozen bank, or fresh draws in randomized mode."""
        if self.settings.mode == "deterministic":
            return self.noise_bank
        return torch.randn(self.noise_bank.shape, generator=self.generator).to(self.device)

    def network_input_limit(self, gradients: bool = False) -> int:
        """The most (image, level, class) inputs :meth:`level_errors` gives one network call,
        without autograd or (``gradients``) with it: the device's limit, scaled down for a
        network costlier than the reference (:data:`REFERENCE_MACS_PER_INPUT`)."""
        if self.max_network_inputs is not None:
            return self.max_network_inputs
        return network_call_limit(self.net, self.device.type, gradients)

    def activation_limit(self) -> int:
        """The most inputs whose activations a gradient pass holds at once (above it, the
        calls run in checkpointed segments of this size)."""
        if self.max_network_inputs is not None:
            return self.max_network_inputs
        return _scaled(self.net, MAX_GRADIENT_INPUTS.get(self.device.type, MAX_GRADIENT_INPUTS["cuda"]))

    def _bounded(self, denoise: Callable[..., torch.Tensor], inputs_per_row: int,
                 *rows: torch.Tensor) -> torch.Tensor:
        """``denoise(*rows)`` in network calls of at most :meth:`network_input_limit` inputs,
        in checkpointed segments of :meth:`activation_limit` under autograd; a stop request
        (:func:`core.runtime.cancellation_scope`) ends it between two calls, forward or
        backward."""
        gradients = torch.is_grad_enabled()
        per_call = max(1, self.network_input_limit(gradients) // inputs_per_row)
        per_segment = max(per_call, self.activation_limit() // inputs_per_row)
        # Taken here, not where a call polls: a checkpointed segment is recomputed during the
        # backward pass, which on CUDA runs on autograd's own thread, outside the scope.
        cancelled = active_cancellation()
        if not gradients or rows[0].shape[0] <= per_segment:
            return _in_calls(denoise, rows, per_call, cancelled)
        return torch.cat([checkpoint(lambda *part: _in_calls(denoise, part, per_call, cancelled), *segment,
                                     use_reentrant=False)
                          for segment in _row_chunks(rows, per_segment)])

    def _autocast(self):
        if not self.settings.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def level_errors(self, x: torch.Tensor, levels: Sequence[int], noise: torch.Tensor,
                     per_class: bool = False, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Squared denoising errors ||D_y(x~ + s_i n_i; s_i) - x~||^2, shape (N, L, K).

        ``classes`` (N, M) restricts each example to M classes of its own; the result is
        then (N, L, M) in that order. ``per_class`` evaluates each class with its own
        pass (K passes; only used to measure the multi-head speed-up).
        """
        x0 = to_model_space(x)
        n, L = x.shape[0], len(levels)
        idx = torch.as_tensor(list(levels), device=self.device)
        sig = self.sigmas[idx]
        x_noisy = (x0.unsqueeze(1) + sig.view(1, L, 1, 1, 1) * noise[idx].unsqueeze(0)).flatten(0, 1)
        sig_b = sig.repeat(n)
        k = self.num_classes
        if classes is not None:
            m = classes.shape[1]
            labels = classes.unsqueeze(1).expand(n, L, m).reshape(-1)
            rep = lambda t: t.repeat_interleave(m, dim=0)  # noqa: E731  (example, level, class) order
            with self._autocast():
                d = self._bounded(self.net.denoise_labels, 1, rep(x_noisy), rep(sig_b), labels)
            d = d.to(x0.dtype).view(n, L, m, *x.shape[1:])
            return (d - x0.view(n, 1, 1, *x.shape[1:])).pow(2).flatten(3).sum(-1)
        with self._autocast():
            if per_class:
                outs = [self.net.denoise(x_noisy, sig_b, heads=[y]) for y in range(k)]
                d = torch.cat(outs, dim=1)
            elif not labels_are_inputs(self.net):  # one pass gives every class
                d = self._bounded(lambda xn, sb: self.net.denoise(xn, sb, heads=list(range(k))), 1, x_noisy, sig_b)
            elif k <= self.network_input_limit(torch.is_grad_enabled()):  # every class of a row in one call
                d = self._bounded(lambda xn, sb: self.net.denoise(xn, sb, heads=list(range(k))), k, x_noisy, sig_b)
            else:  # a row's K classes exceed one call (a costly network): one input per class
                labels = torch.arange(k, device=self.device).repeat(x_noisy.shape[0])
                rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731  (example, level, class) order
                d = self._bounded(self.net.denoise_labels, 1, rep(x_noisy), rep(sig_b), labels)
        d = d.to(x0.dtype).view(n, L, k, *x.shape[1:])
        return (d - x0.view(n, 1, 1, *x.shape[1:])).pow(2).flatten(3).sum(-1)

    def _passes(self, x: torch.Tensor, noise: torch.Tensor, levels_per_step: int,
                per_class: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """The one quadrature that :meth:`forward` and :meth:`stream` both run.

        Visits the levels in :func:`interleaved_order`, ``levels_per_step`` at a time, and
        yields ``(levels_done, estimate, errors)``: the logits estimated from the levels so
        far (partial sums rescaled to the full weight mass, so estimates are comparable
        across steps) and the (N, L, K) errors of this chunk (NaN for eliminated classes).
        With progressive elimination (:attr:`ClassifierSettings.eliminates`) the levels
        after the screening ones are evaluated on each example's ``keep_classes`` leading
        classes only; an eliminated class keeps its screening estimate shifted by the
        smallest change of a kept class's estimate, so it always ranks below every kept
        class. The last estimate is the classifier's output.
        """
        config = self.net.config
        check_image_batch(x, config.in_channels, config.image_size)
        s = self.settings
        t, k = s.steps, self.num_classes
        order = interleaved_order(t)
        total_mass = self.weights.sum()
        acc = torch.zeros(x.shape[0], k, device=self.device, dtype=x.dtype)
        mass_done = torch.zeros((), device=self.device)
        screen = s.screen_levels if s.eliminates and s.keep_classes < k else t
        kept: torch.Tensor | None = None
        kept_acc = kept_mass = screened = None  # set together with kept, after the screening levels
        done = 0
        while done < t:
            end = min(done + levels_per_step, screen if done < screen else t)
            levels = order[done:end]
            w = self.weights[levels]
            if kept is None:
                err = self.level_errors(x, levels, noise, per_class)
                acc = acc - (err * w.view(1, -1, 1)).sum(1)
                mass_done = mass_done + w.sum()
                estimate = acc * (total_mass / mass_done) if end < t else acc
            else:
                part = self.level_errors(x, levels, noise, classes=kept)
                kept_acc = kept_acc - (part * w.view(1, -1, 1)).sum(1)
                kept_mass = kept_mass + w.sum()
                scaled = kept_acc * (total_mass / kept_mass) if end < t else kept_acc
                # An eliminated class keeps its screening estimate, moved by the smallest
                # (full - screening) change among the kept classes: comparable in scale, and
                # never above a kept class (a raw screening estimate can be, when the
                # screening levels under-estimate the errors).
                offset = (scaled - screened.gather(1, kept)).min(dim=1, keepdim=True).values
                estimate = (screened + offset).scatter(1, kept, scaled)
                err = torch.full((x.shape[0], len(levels), k), float("nan"), device=self.device, dtype=part.dtype)
                err = err.scatter(2, kept.unsqueeze(1).expand(-1, len(levels), -1), part)
            done = end
            yield done, estimate + self.log_prior, err
            if kept is None and done == screen and screen < t:
                screened = estimate
                # the selection is a (piecewise constant) part of the deployed classifier; it ranks
                # the logits as they are output (prior included), so an eliminated class stays
                # below every kept one
                kept = (estimate + self.log_prior).detach().topk(s.keep_classes, dim=1).indices
                kept_acc, kept_mass = acc.gather(1, kept), mass_done

    def forward(self, x: torch.Tensor, per_class: bool = False) -> torch.Tensor:
        """Logits (N, K) for images (N, C, H, W) in [0, 1]; differentiable in ``x``."""
        noise = self.draw_noise()
        estimate = None
        for _, estimate, _ in self._passes(x, noise, self.settings.levels_per_pass or self.settings.steps,
                                           per_class):
            pass
        return estimate

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(self.forward(x), dim=1)

    def stream(self, x: torch.Tensor, levels_per_step: int = 1,
               cancelled: Callable[[], bool] = lambda: False) -> Iterator[ClassifyStep]:
        """Yield the running estimate after each chunk of ``levels_per_step`` levels.

        Levels are visited in an interleaved order (a stratified subset of the grid at
        every step) and the partial weighted sum is rescaled to the full mass, so the
        estimate is comparable across steps; after the last step it equals
        :meth:`forward` (in deterministic mode; randomized mode draws other noise per call). ``level_errors`` of a record follow the visiting order (NaN for
        classes eliminated by progressive elimination).
        """
        noise = self.draw_noise()
        t = self.settings.steps
        order = interleaved_order(t)
        with torch.no_grad():
            if cancelled():
                return
            for done, est, err in self._passes(x, noise, levels_per_step):
                yield ClassifyStep(
                    levels_done=done, total_levels=t,
                    sigmas_done=self.sigmas[order[:done]].cpu().numpy().copy(),
                    logits=est.cpu().numpy().copy(),
                    probabilities=torch.softmax(est, dim=1).cpu().numpy().copy(),
                    level_errors=err.cpu().numpy().copy(),
                )
                if cancelled():
                    return


def network_call_limit(net: nn.Module, device_type: str, gradients: bool = False) -> int:
    """The most inputs one call of ``net`` gets on a device of ``device_type``, without
    autograd or (``gradients``) with it: :data:`MAX_NETWORK_INPUTS` or
    :data:`MAX_GRADIENT_CALL_INPUTS`, scaled down for a network costlier than the reference
    (:data:`REFERENCE_MACS_PER_INPUT`; not the CUDA limit without autograd)."""
    limits = MAX_GRADIENT_CALL_INPUTS if gradients else MAX_NETWORK_INPUTS
    limit = limits.get(device_type, limits["cuda"])
    if not gradients and device_type != "cpu":
        return limit
    return _scaled(net, limit)


def _scaled(net: nn.Module, limit: int) -> int:
    """``limit`` for ``net``, 1/c of it for a network c times as costly as the reference."""
    cost = count_macs_per_input(net) / REFERENCE_MACS_PER_INPUT
    return limit if cost <= 1 else max(1, int(limit / cost))


def labels_are_inputs(net: nn.Module) -> bool:
    """Whether ``net`` takes the class as an input, so K classes cost K network inputs (the
    class-embedding network, a class-conditional EDM network), rather than giving every class
    from one pass (the multi-head network)."""
    architecture = net.config.architecture
    return architecture == "embedding" or (architecture == "edm" and net.config.num_classes > 0)


def count_macs_per_input(net: nn.Module) -> int:
    """Multiply-adds of one network input (one image, level and class) in ``net``'s
    convolutions, linear layers and batched matrix products: a deterministic measure of its
    cost per input. Counted once, with one input, and cached on ``net``: on first use,
    inside the first pass that needs it (so in the app on the worker thread, never on the
    GUI thread; benchmarks time passes after a warm-up)."""
    cached = getattr(net, "_macs_per_input", None)
    if cached is None:
        config = net.config
        first = next(net.parameters(), None)  # the input takes the network's device and dtype
        like = {"device": first.device, "dtype": first.dtype} if first is not None else {}
        x = torch.zeros(1, config.in_channels, config.image_size, config.image_size, **like)
        counter = _MacCounter()
        with torch.no_grad(), counter:
            net.denoise_labels(x, torch.ones(1, **like), torch.zeros(1, dtype=torch.long, device=x.device))
        cached = counter.macs
        net._macs_per_input = cached
    return cached


class _MacCounter(TorchFunctionMode):
    """Counts the multiply-adds of the convolutions, linear layers and matrix products run
    inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (F.conv2d, F.conv1d, F.conv3d):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.macs += out.numel() * weight[0].numel()  # (C_in / groups) x kernel per output
        elif func in (F.conv_transpose2d, F.conv_transpose1d, F.conv_transpose3d):
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.macs += args[0].numel() * weight[0].numel()  # (C_out / groups) x kernel per input
        elif func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.macs += out.numel() * weight.shape[-1]
        elif func in (torch.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.baddbmm):
            first = args[1] if func is torch.baddbmm else args[0]
            self.macs += out.numel() * first.shape[-1]
        return out


def _row_chunks(rows: Sequence[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    for start in range(0, rows[0].shape[0], size):
        yield [r[start:start + size] for r in rows]


def _in_calls(denoise: Callable[..., torch.Tensor], rows: Sequence[torch.Tensor], per_call: int,
              cancelled: Callable[[], bool] | None) -> torch.Tensor:
    """``denoise`` on ``per_call`` rows at a time, polling ``cancelled`` (a cancellation
    scope's request, or None) before each call and, when the output takes gradients, before
    each call's backward."""
    parts = []
    for chunk in _row_chunks(rows, per_call):
        raise_if_cancelled(cancelled)
        out = denoise(*chunk)
        if cancelled is not None and out.requires_grad:
            out.register_hook(lambda grad: raise_if_cancelled(cancelled))
        parts.append(out)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def interleaved_order(steps: int) -> list[int]:
    """A permutation of range(steps) whose every prefix spreads over the whole grid.

    Bit-reversal (van der Corput) order: 8 levels are visited as 0, 4, 2, 6, 1, 5, 3, 7.
    """
    bits = max(1, (steps - 1).bit_length())
    keys = sorted(range(steps), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return keys


def classify_batches(clf: DiffusionClassifier, images: torch.Tensor, batch_size: int = 64,
                     cancelled=lambda: False) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start index, logits) for consecutive batches of ``images`` (no grad)."""
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            if cancelled():
                return
            yield i, clf(images[i:i + batch_size].to(clf.device))


class UnconditionalModelError(ValueError):
    """The model has no classes, so it cannot classify (it can only purify)."""


def classifier_settings(model, preset: str | None = None, **overrides) -> ClassifierSettings:
    """The classifier settings of a loaded model: the card's ``classifier`` defaults, then
    the named preset's (default: the one the card names, if any), then ``overrides``.

    Overrides whose value is None are ignored, so CLI flags can be passed through. Fewer
    levels than the card's or preset's screening levels (``steps`` overridden, the
    screening not) turn progressive class elimination off: with every level screened no
    class is eliminated.

    Raises
    ------
    ValueError
        For an unknown preset name, an override that is no ``ClassifierSettings`` field, or
        invalid settings.
    """
    from .presets import get_preset

    if unknown := sorted(set(overrides) - set(ClassifierSettings.__dataclass_fields__)):
        raise ValueError(f"unknown classifier setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                         f"(the settings: {', '.join(ClassifierSettings.__dataclass_fields__)}; the noise "
                         f"levels T are 'steps')")
    base = dict(model.classifier_defaults)
    if unknown := sorted(set(base) - set(ClassifierSettings.__dataclass_fields__)):
        # as for the card's purification settings: a misspelt key would otherwise be ignored silently
        raise ValueError(f"the card's classifier entry has unknown setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} (the settings: "
                         f"{', '.join(ClassifierSettings.__dataclass_fields__)})")
    name = preset if preset is not None else model.card.get("preset")
    if name:
        base.update(get_preset(name).classifier)
        base["preset"] = name
    changes = {k: v for k, v in overrides.items() if v is not None}
    if ("steps" in changes and "screen_levels" not in changes
            and changes["steps"] <= int(base.get("screen_levels", 0) or 0)):
        changes.update(screen_levels=0, keep_classes=0)
    return ClassifierSettings.from_dict({**base, **changes})


def build_classifier(model, device: str | torch.device = "cpu", preset: str | None = None,
                     **overrides) -> DiffusionClassifier:
    """A classifier for a loaded model: the card's ``classifier`` defaults, the preset's,
    then overrides (see :func:`classifier_settings`).

    Parameters
    ----------
    model : LoadedModel
        A class-conditional model with its card.
    device : str or torch.device
        Where the classifier runs.
    preset : str, optional
        A named preset of :mod:`core.presets` (``paper``, ``paper-code``, ``fast``);
        default: the one the model card names, if any.
    **overrides
        ``ClassifierSettings`` fields; those whose value is None are ignored, so
        CLI flags can be passed through.

    Raises
    ------
    UnconditionalModelError
        If the model is unconditional (no class names on its card).
    ValueError
        For an unknown preset or setting, or invalid settings (:func:`classifier_settings`).
    """
    if not model.classes:
        raise UnconditionalModelError(
            f"{model.name} is an unconditional model: it has no classes to compare, so it cannot "
            "classify on its own (it can serve as the purifier beside a class-conditional model)")
    return DiffusionClassifier(model.net, classifier_settings(model, preset, **overrides)).to(device)

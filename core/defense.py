"""Assembling a defense: the one place where the attacked module is put together.

Every front end (the ``rdc`` CLI, the desktop app, the scripts and benchmarks) builds
the module it classifies or attacks here: the small CNN baseline (``cnn``), the
diffusion classifier alone (``dc``), or the Robust Diffusion Classifier (``rdc``:
likelihood maximisation, then the classifier, with a gradient mode). The helpers around
it (device, threads, eps fractions, purification settings from a model card) raise
engine errors that describe the problem; each front end words its own hint.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from .choices import DEFENSES, parse_fraction  # parse_fraction: public here too
from .purify import LikelihoodMaximizer, PurifySettings

if TYPE_CHECKING:
    from .classifier import DiffusionClassifier
    from .models import LoadedModel
    from .nets import Denoiser


class DeviceUnavailableError(RuntimeError):
    """The requested compute device cannot be used on this machine."""


def resolve_device(name: str = "auto") -> str:
    """The torch device to run on: ``auto`` picks ``cuda`` when available, else ``cpu``.

    Raises
    ------
    DeviceUnavailableError
        When ``cuda`` is requested and this torch build or machine has no CUDA device.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceUnavailableError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailableError("the MPS device was requested but is not available")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("the CUDA device was requested but CUDA is not available "
                                     "(no GPU, or a CPU-only torch build)")
    return name


def default_threads() -> int:
    """The CPU threads to use when none are asked for: ``OMP_NUM_THREADS`` when it is set (as
    PyTorch itself reads it), else one per core this process may run on (``taskset``, cgroup
    CPU sets)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity on macOS and Windows
        return max(1, os.cpu_count() or 1)


def setup_threads(threads: int = 0) -> int:
    """Set torch's CPU threads (0: :func:`default_threads`) and return the count set."""
    count = threads if threads > 0 else default_threads()
    torch.set_num_threads(count)
    return count


def purify_settings(model: LoadedModel, preset: str | None = None, **overrides) -> PurifySettings:
    """The model card's ``purify`` defaults, the named preset's (default: the one the card
    names, if any; see :mod:`core.presets`), then ``overrides``.

    Overrides whose value is None are ignored (so unset options can be passed through);
    ``eta`` and ``step_size`` may be fractions such as ``"8/255"``.

    Raises
    ------
    ValueError
        For an unknown preset or invalid settings.
    """
    from .presets import get_preset

    base = dict(model.card.get("purify", {}))
    name = preset if preset is not None else model.card.get("preset")
    if name:
        base.update(get_preset(name).purify)
        base["preset"] = name
    for key, value in overrides.items():
        if value is None:
            continue
        base[key] = parse_fraction(value) if key in ("eta", "step_size") else value
    return PurifySettings(**base)


def purifier_net(model: LoadedModel, settings: PurifySettings) -> Denoiser:
    """The denoiser whose score the likelihood maximisation follows: the model's separate
    purifier when its card names one (the paper's unconditional EDM model), else the model
    itself. The ``mixture`` score needs the class heads, so it always uses the model.
    """
    return model.net if settings.score == "mixture" else model.purifier_net


def build_maximizer(model: LoadedModel, settings: PurifySettings | None = None) -> LikelihoodMaximizer:
    """The likelihood maximisation of a loaded model (default settings: the card's)."""
    settings = settings if settings is not None else purify_settings(model)
    return LikelihoodMaximizer(purifier_net(model, settings), settings)


def binarization_threshold(value: float) -> float:
    """``value`` as a binarisation threshold, which must lie strictly between 0 and 1.

    Raises
    ------
    ValueError
        When it does not.
    """
    if not 0.0 < value < 1.0:
        raise ValueError(f"the binarisation threshold must lie strictly between 0 and 1, not {value:g}")
    return float(value)


def attack_threshold(method: str, binarize: float | None) -> dict[str, float]:
    """The ``threshold`` setting of :class:`core.attacks.AttackSettings` for attack ``method``
    on a defense binarised at ``binarize`` (None: not binarised), as keyword arguments: the
    flip attack gets the defense's threshold; other attacks take none ({}).

    Raises
    ------
    ValueError
        For the flip attack on a defense that does not binarise its input.
    """
    if method != "flip":
        return {}
    if binarize is None:
        raise ValueError("the flip attack is for a defense that binarises its input: give --binarize THRESHOLD")
    return {"threshold": binarization_threshold(binarize)}


class InputBinarization(nn.Module):
    """A defense that sees its input binarised: every pixel becomes 1 above ``threshold``,
    else 0 (the Binary-ABS trick of Schott et al., 2019, for l-inf on MNIST: a perturbation
    smaller than a pixel's distance to the threshold cannot change what the defense sees).

    The threshold has zero gradient almost everywhere, so attacks get the straight-through
    estimate instead (the identity, i.e. BPDA): the gradient of ``defense`` at the binarised
    image. Attribute look-ups the wrapper does not answer (``grad_mode``, ``maximizer``, ...)
    go to ``defense``.
    """

    def __init__(self, defense: nn.Module, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = binarization_threshold(threshold)
        self.defense = defense

    def binarize(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` thresholded, with the straight-through (identity) gradient."""
        hard = (x > self.threshold).to(x.dtype)
        return x + (hard - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.defense(self.binarize(x))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("defense")
            if inner is None:  # not yet (or no longer) wrapping anything: e.g. while being copied
                raise
            return getattr(inner, name)


def unwrap_defense(defense: nn.Module) -> nn.Module:
    """The defense inside any :class:`InputBinarization` wrapper."""
    while isinstance(defense, InputBinarization):
        defense = defense.defense
    return defense


def build_defense(kind: str, model: LoadedModel | None, classifier: DiffusionClassifier | None, *,
                  purify: PurifySettings | None = None, grad_mode: str = "auto",
                  cnn: str | nn.Module = "mnist-cnn", device: str | None = None,
                  binarize: float | None = None) -> nn.Module:
    """The module a front end classifies with or attacks (NCHW in [0, 1] in, logits out).

    Parameters
    ----------
    kind
        ``cnn`` (the baseline named or given by ``cnn``), ``dc`` (``classifier`` itself)
        or ``rdc`` (likelihood maximisation with ``purify``, default: the model card's,
        then ``classifier`` itself, with its prior and call limit). The likelihood
        maximisation uses the model's purifier network when its card names one
        (:func:`purifier_net`).
    model, classifier
        The loaded diffusion model and its classifier (not needed for ``cnn``).
    grad_mode
        ``rdc``: ``auto`` (smooth for sign-step purification, exact for Adam), ``exact``,
        ``smooth``, ``bpda`` or ``dc-only``; the returned module's ``grad_mode``
        attribute holds the resolved mode.
    device
        Where the module lives (default: the classifier's device, else CPU). The module
        shares the model's networks and the classifier: another device moves them too.
    binarize
        A threshold in (0, 1): the defense sees its input binarised there, attacked through
        a straight-through gradient (:class:`InputBinarization`); None (default): as is.

    Raises
    ------
    ValueError
        For an unknown ``kind`` or gradient mode, or a missing model or classifier.
    core.models.CheckpointError
        When the CNN checkpoint cannot be loaded.
    """
    if kind not in DEFENSES:
        raise ValueError(f"defense must be one of {DEFENSES}, not {kind!r}")
    if binarize is not None:
        inner = build_defense(kind, model, classifier, purify=purify, grad_mode=grad_mode, cnn=cnn, device=device)
        return InputBinarization(inner, binarize)
    if device is None:
        device = str(classifier.device) if classifier is not None else "cpu"
    if kind == "cnn":
        if isinstance(cnn, nn.Module):
            return cnn.to(device)
        from .baseline import load_cnn

        return load_cnn(cnn, device=device)[0]
    if classifier is None:
        raise ValueError(f"the {kind} defense needs a diffusion classifier")
    if kind == "dc":
        return classifier.to(device)
    if model is None:
        raise ValueError("the rdc defense needs the loaded diffusion model")
    from .rdc import RobustDiffusionClassifier

    settings = purify if purify is not None else purify_settings(model)
    if classifier.net is not model.net:
        raise ValueError("the rdc defense needs a classifier of the loaded model's network")
    return RobustDiffusionClassifier(model.net, classifier, settings, grad_mode,
                                     purifier=purifier_net(model, settings)).to(device)


def gradient_warning(defense: nn.Module) -> str | None:
    """Why attacking ``defense`` with its gradient mode gives masked gradients, or None
    (engine terms: each front end adds how to choose another mode)."""
    from .rdc import RobustDiffusionClassifier, masked_gradient_warning

    defense = unwrap_defense(defense)
    if not isinstance(defense, RobustDiffusionClassifier):
        return None
    return masked_gradient_warning(defense.grad_mode, defense.maximizer.settings)

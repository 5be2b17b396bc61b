"""The Robust Diffusion Classifier: likelihood maximisation followed by the diffusion classifier.

``RobustDiffusionClassifier`` is a plain ``nn.Module`` (NCHW in [0, 1] in, logits (N, K)
out) so that any attack library can use it. Gradient modes:

* ``exact``: back-propagate through the N likelihood-maximisation steps (second order:
  the inner gradients are taken with ``create_graph``) and the classifier;
* ``smooth``: as ``exact``, but the backward pass of every sign step uses the derivative
  of ``tanh(g / tau)`` (``tau``: the example's mean ``|g|``) instead of that of
  ``sign(g)``, which is zero almost everywhere. With sign steps the ``exact`` gradient
  therefore ignores how the purification responds to the input and reduces to BPDA up
  to the clipping masks; the smooth surrogate (a differentiable approximation in the
  sense of BPDA, Athalye et al. 2018) lets an attack see that response. The forward
  pass is unchanged;
* ``bpda``: identity through the purification, exact through the classifier;
* ``dc-only``: the classifier alone, without purification.
"""
from __future__ import annotations

import torch
from torch import nn

from .classifier import ClassifierSettings, DiffusionClassifier
from .data import check_image_batch
from .nets import Denoiser
from .purify import LikelihoodMaximizer, PurifySettings
from .runtime import raise_if_cancelled

GRAD_MODES = ("exact", "smooth", "bpda", "dc-only")


def resolve_grad_mode(grad_mode: str, purify: PurifySettings) -> str:
    """The gradient mode an attack should use: ``auto`` picks the adaptive one.

    ``auto`` is ``smooth`` when the likelihood maximisation takes sign steps (their
    exact derivative is zero, so exact gradients are masked) and ``exact`` otherwise
    (Adam steps are differentiable). Any other mode is returned unchanged.
    """
    if grad_mode != "auto":
        return grad_mode
    return "smooth" if purify.optimizer == "sign" and purify.steps > 0 else "exact"


def masked_gradient_warning(grad_mode: str, purify: PurifySettings) -> str | None:
    """Why ``grad_mode`` gives a masked gradient for this purification, or None.

    ``exact`` gradients through sign steps carry no information about how the steps
    respond to the input (the derivative of sign is zero), and none at all on pixels the
    steps clamp to 0 or 1; on the bundled MNIST model they overstate robustness by far.
    """
    if grad_mode == "exact" and purify.optimizer == "sign" and purify.steps > 0:
        return ("exact gradients through the likelihood maximisation's sign steps are masked (the derivative of "
                "sign is zero); the smooth or bpda gradient mode gives an adaptive attack")
    return None


class RobustDiffusionClassifier(nn.Module):
    """LM (``purify``) then DC (``classifier``), with a selectable gradient mode."""

    def __init__(self, net: Denoiser, classifier: ClassifierSettings | DiffusionClassifier | None = None,
                 purify: PurifySettings | None = None, grad_mode: str = "exact",
                 purifier: Denoiser | None = None) -> None:
        """``classifier``: the settings of a new classifier on ``net``, or a classifier of
        ``net`` used as it is (with its prior, call limit and generator); ``purifier``: the
        denoiser of the likelihood maximisation, when it is a separate (unconditional)
        network, as in the paper's CIFAR-10 setup; default ``net``."""
        super().__init__()
        if grad_mode not in GRAD_MODES + ("auto",):
            raise ValueError(f"grad_mode must be auto or one of {GRAD_MODES}, got {grad_mode!r}")
        if isinstance(classifier, DiffusionClassifier):
            if classifier.net is not net:
                raise ValueError("the classifier given must be one of the network given")
            self.classifier = classifier
        else:
            self.classifier = DiffusionClassifier(net, classifier)
        self.maximizer = LikelihoodMaximizer(purifier if purifier is not None else net, purify)
        if purifier is not None and purifier is not net:
            self.purifier_net = purifier  # a submodule, so .to(device) moves it too
        self.grad_mode = resolve_grad_mode(grad_mode, self.maximizer.settings)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def purify(self, x: torch.Tensor, create_graph: bool = False, smooth_sign: bool = False) -> torch.Tensor:
        """The purified images; differentiable in ``x`` when ``create_graph``.

        ``smooth_sign`` (with ``create_graph``) back-propagates sign steps through
        ``tanh(g / tau)``; the values are those of the sign steps.
        """
        lm = self.maximizer
        sigmas, noises = lm.draws()
        x_orig = x if create_graph else x.detach()
        cur, moments = x_orig, None
        for i in range(lm.settings.steps):
            raise_if_cancelled()  # a stop request inside an attack's pass (core.runtime.cancellation_scope)
            cur, _, moments = lm.step(cur, x_orig, i, sigmas[i], noises[i], moments, create_graph=create_graph,
                                      smooth_sign=smooth_sign)
        return cur if create_graph else cur.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_mode == "dc-only":
            return self.classifier(x)
        config = self.classifier.net.config  # as the DC: a 0-255 image would be clamped by the purification
        check_image_batch(x, config.in_channels, config.image_size)
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self.grad_mode in ("exact", "smooth") and needs_grad:
            return self.classifier(self.purify(x, create_graph=True, smooth_sign=self.grad_mode == "smooth"))
        purified = self.purify(x)
        if needs_grad:  # BPDA: the purification acts as the identity for gradients
            purified = x + (purified - x).detach()
        return self.classifier(purified)

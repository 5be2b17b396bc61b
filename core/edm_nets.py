"""EDM's denoiser networks and preconditionings, written from the papers.

These are the networks of Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models" (EDM), Table 1 and Appendix F:

* :class:`SongUNet`, the DDPM++ / NCSN++ U-Net of Song et al. 2021 ("Score-Based
  Generative Modeling through Stochastic Differential Equations") with both option
  sets: DDPM++ (positional noise embedding, standard encoder, resampling filter
  [1, 1]) and NCSN++ (random Fourier embedding, residual encoder, filter [1, 3, 3, 1]);
* :class:`DhariwalUNet`, the ADM U-Net of Dhariwal & Nichol 2021;
* the VP, VE and EDM preconditionings (Table 1: c_skip, c_out, c_in, c_noise).

Module and parameter names follow EDM's, so that the state dict of an EDM network
(``model.enc.32x32_block0.conv0.weight`` ...) loads into :class:`EdmDenoiser` as it is.
:class:`EdmDenoiser` also exposes the project's denoiser interface (``config``,
``denoise``, ``denoise_labels``), so the diffusion classifier, purification, the
sampler and the attacks use an imported EDM model unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .choices import whole_number
from .diffusion import Preconditioning, precondition

EDM_ARCHITECTURE = "edm"
PRECONDITIONINGS = ("vp", "ve", "edm")
MODEL_TYPES = ("SongUNet", "DhariwalUNet")
PRECOND_CLASS_NAMES = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}

# Constructor arguments of each preconditioning besides the image geometry, with EDM's
# defaults (Table 1 of the paper; VP: beta_d, beta_min, M, epsilon_t).
PRECOND_DEFAULTS: dict[str, dict[str, float]] = {
    "vp": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
    "ve": {"sigma_min": 0.02, "sigma_max": 100.0},
    "edm": {"sigma_min": 0.0, "sigma_max": float("inf"), "sigma_data": 0.5},
}

# Network keyword arguments each model type accepts (besides the image geometry and
# label_dim), with EDM's defaults.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "SongUNet": {
        "augment_dim": 0, "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
        "num_blocks": 4, "attn_resolutions": [16], "dropout": 0.10, "label_dropout": 0.0,
        "embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
        "decoder_type": "standard", "resample_filter": [1, 1],
    },
    "DhariwalUNet": {
        "augment_dim": 0, "model_channels": 192, "channel_mult": [1, 2, 3, 4], "channel_mult_emb": 4,
        "num_blocks": 3, "attn_resolutions": [32, 16, 8], "dropout": 0.10, "label_dropout": 0.0,
    },
}


# -- layers ------------------------------------------------------------------------------

def _resample_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The separable 2-D resampling kernel of a 1-D filter, normalised to sum 1, (1, 1, k, k)."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


def _upsample(x: torch.Tensor, kernel: torch.Tensor, padding: int) -> torch.Tensor:
    """2x upsampling: zero insertion and depthwise filtering (gain 4 keeps the mean)."""
    c = x.shape[1]
    return F.conv_transpose2d(x, (kernel * 4).repeat(c, 1, 1, 1), stride=2, padding=padding, groups=c)


def _downsample(x: torch.Tensor, kernel: torch.Tensor, padding: int) -> torch.Tensor:
    """2x downsampling: depthwise filtering with stride 2."""
    c = x.shape[1]
    return F.conv2d(x, kernel.repeat(c, 1, 1, 1), stride=2, padding=padding, groups=c)


class Linear(nn.Module):
    """Fully connected layer (``weight`` is (out, in))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), b)


class Conv2d(nn.Module):
    """Convolution with optional 2x up- or downsampling by a FIR filter.

    ``kernel = 0`` gives a pure resampling layer (no weights). The filter is kept as a
    buffer named ``resample_filter`` on resampling layers only. ``fused_resample``
    convolves before downsampling (or upsamples before convolving) with the padding
    split between the two, as NCSN++'s residual encoder does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a layer resamples up or down, not both")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        if kernel:
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            nn.init.xavier_uniform_(self.weight)
        else:
            self.weight = None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            x = F.conv2d(_upsample(x, f, max(f_pad - w_pad, 0)), w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = _downsample(F.conv2d(x, w, padding=w_pad + f_pad), f, 0)
        else:
            if self.up:
                x = _upsample(x, f, f_pad)
            elif self.down:
                x = _downsample(x, f, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).view(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with at most 32 groups of at least 4 channels."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block with embedding conditioning, optional resampling and self-attention.

    The union of the DDPM++, NCSN++ and ADM blocks: ``adaptive_scale`` applies the
    embedding as a scale and shift after the second normalisation (ADM), otherwise it is
    added before it (DDPM++/NCSN++); ``skip_scale`` multiplies each residual sum
    (1/sqrt(2) in DDPM++/NCSN++).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, float(skip_scale), adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        nn.init.zeros_(self.conv1.weight)
        self.skip = None
        if in_channels != out_channels or up or down:
            proj = resample_proj or in_channels != out_channels
            self.skip = Conv2d(in_channels, out_channels, 1 if proj else 0, up=up, down=down,
                               resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)
            nn.init.zeros_(self.proj.weight)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        heads = self.num_heads
        # channel layout of qkv: (head, channel within head, q/k/v)
        qkv = self.qkv(self.norm2(x)).reshape(n * heads, c // heads, 3, h * w)
        q, k, v = (t.float() for t in qkv.unbind(2))  # (n*heads, c/heads, hw)
        # softmax over keys in float32; plain matmuls keep it differentiable to any order
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(q.shape[1]), dim=2)
        a = torch.bmm(v, weights.transpose(1, 2))  # (n*heads, c/heads, hw)
        return a.to(x.dtype).reshape(n, c, h, w)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self._attention(h)) + h) * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the noise label, [cos, sin] of geometric frequencies."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** exponents
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++), frequencies ~ N(0, scale^2)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# -- networks ----------------------------------------------------------------------------

class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net (Song et al. 2021) as configured in EDM.

    Parameters follow EDM's names: ``embedding_type`` ('positional' for DDPM++,
    'fourier' for NCSN++), ``channel_mult_noise`` (1 / 2), ``encoder_type``
    ('standard', 'skip' or 'residual'), ``decoder_type`` ('standard' or 'skip'),
    ``resample_filter`` ([1, 1] / [1, 3, 3, 1]).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)) -> None:
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)

        # mapping network: noise label (+ class label, + augmentation label) -> embedding
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # encoder
        self.enc = nn.ModuleDict()
        c = in_channels
        c_aux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels, 3)
                c = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(c_aux, c_aux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(c_aux, c, 1)
                elif encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(c_aux, c, 3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True)
                    c_aux = c
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, model_channels * mult,
                                                              attention=res in attn_resolutions, **block)
                c = model_channels * mult

        # decoder
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]
        self.dec = nn.ModuleDict()
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)
            for i in range(num_blocks + 1):
                c_in = c + skips.pop()
                c = model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(
                    c_in, c, attention=(i == num_blocks and res in attn_resolutions), **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(c, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c, out_channels, 3)
                nn.init.zeros_(self.dec[f"{res}x{res}_aux_conv"].weight)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips: list[torch.Tensor] = []
        aux = x
        for name, m in self.enc.items():
            if name.endswith("_aux_down"):
                aux = m(aux)
            elif name.endswith("_aux_skip"):
                x = x + m(aux)
                skips[-1] = x
            elif name.endswith("_aux_residual"):
                x = (x + m(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
                skips.append(x)

        out = None
        tmp = None
        for name, m in self.dec.items():
            if name.endswith("_aux_up"):
                out = m(out)
            elif name.endswith("_aux_norm"):
                tmp = m(x)
            elif name.endswith("_aux_conv"):
                tmp = m(F.silu(tmp))
                out = tmp if out is None else out + tmp
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) as configured in EDM."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0) -> None:
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels * mult, 3)
                c = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, model_channels * mult,
                                                              attention=res in attn_resolutions, **block)
                c = model_channels * mult
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)
            for i in range(num_blocks + 1):
                c_in = c + skips.pop()
                c = model_channels * mult
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(c_in, c, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(c)
        self.out_conv = Conv2d(c, out_channels, 3)
        nn.init.zeros_(self.out_conv.weight)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand(x.shape[0], 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips: list[torch.Tensor] = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)
        for m in self.dec.values():
            if x.shape[1] != m.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# -- preconditionings (EDM Table 1) ------------------------------------------------------

def vp_sigma(t: torch.Tensor | float, beta_d: float, beta_min: float) -> torch.Tensor:
    """VP noise level at time t: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t, dtype=torch.float32, device="cpu")
    return ((0.5 * beta_d * t ** 2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma: torch.Tensor, beta_d: float, beta_min: float) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`: the time t at which the VP process has noise level sigma."""
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d


def precond_coefficients(kind: str, sigma: torch.Tensor, params: dict[str, float]) -> Preconditioning:
    """c_skip, c_out, c_in, c_noise of the VP, VE or EDM preconditioning for ``sigma``.

    ``sigma`` is a float tensor of any shape; the coefficients have its shape.
    """
    one = torch.ones_like(sigma)
    if kind == "vp":
        c_noise = (params["M"] - 1) * vp_sigma_inv(sigma, params["beta_d"], params["beta_min"])
        return Preconditioning(c_skip=one, c_out=-sigma, c_in=1 / (sigma ** 2 + 1).sqrt(), c_noise=c_noise)
    if kind == "ve":
        return Preconditioning(c_skip=one, c_out=sigma, c_in=one, c_noise=(0.5 * sigma).log())
    if kind == "edm":
        return precondition(sigma, float(params["sigma_data"]))
    raise ValueError(f"unknown preconditioning {kind!r}; expected one of {PRECONDITIONINGS}")


# -- configuration and the project-facing denoiser -----------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class EdmNetConfig:
    """An EDM network: preconditioning, network type and their keyword arguments.

    ``num_classes`` is EDM's ``label_dim`` (0 for an unconditional model),
    ``image_size`` its ``img_resolution`` and ``in_channels`` its ``img_channels``.
    ``model_kwargs`` holds the remaining network arguments (EDM's names), and
    ``precond_kwargs`` those of the preconditioning.
    """

    architecture: str = EDM_ARCHITECTURE
    precond: str = "vp"
    model_type: str = "SongUNet"
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    precond_kwargs: dict[str, float] = field(default_factory=dict)
    use_fp16: bool = False  # recorded from the snapshot; fp16 is the caller's choice here (autocast)

    def __post_init__(self) -> None:
        if self.architecture != EDM_ARCHITECTURE:
            raise ValueError(f"architecture must be {EDM_ARCHITECTURE!r}, got {self.architecture!r}")
        if self.precond not in PRECONDITIONINGS:
            raise ValueError(f"precond must be one of {PRECONDITIONINGS}, got {self.precond!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        allowed = MODEL_DEFAULTS[self.model_type]
        unknown = sorted(set(self.model_kwargs) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {self.model_type} arguments: {unknown}")
        unknown = sorted(set(self.precond_kwargs) - set(PRECOND_DEFAULTS[self.precond]))
        if unknown:
            raise ValueError(f"unknown {self.precond} preconditioning arguments: {unknown}")
        self.model_kwargs = {k: _jsonable(v) for k, v in self.model_kwargs.items()}
        self.precond_kwargs = {k: float(v) for k, v in self.precond_kwargs.items()}
        # bounds far above the published networks (ADM: 192 channels, mult 4, 3 blocks); the loader
        # compares a config with the weights file's header before building the network
        for name, hi in (("image_size", 512), ("in_channels", 4), ("num_classes", 1000)):
            setattr(self, name, whole_number(name, getattr(self, name), 0, hi))
        full = self.full_model_kwargs()
        for name, hi in (("model_channels", 1024), ("num_blocks", 8), ("augment_dim", 64), ("channel_mult_emb", 8)):
            whole_number(name, full[name], 0, hi)
        mult = full["channel_mult"]
        if not isinstance(mult, list) or not 1 <= len(mult) <= 6:
            raise ValueError(f"channel_mult must list 1-6 whole numbers in 1-8, not {mult!r:.60}")
        for m in mult:
            whole_number("each channel_mult", m, 1, 8)
        levels = len(mult)
        if self.image_size < 1 or self.image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2**{levels - 1}")

    @property
    def label_dim(self) -> int:
        return self.num_classes

    def full_model_kwargs(self) -> dict[str, Any]:
        """The network's keyword arguments with EDM's defaults filled in."""
        return {**MODEL_DEFAULTS[self.model_type], **self.model_kwargs}

    def full_precond_kwargs(self) -> dict[str, float]:
        return {**PRECOND_DEFAULTS[self.precond], **self.precond_kwargs}

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture, "precond": self.precond, "model_type": self.model_type,
            "image_size": self.image_size, "in_channels": self.in_channels, "num_classes": self.num_classes,
            "model_kwargs": dict(self.model_kwargs),
            # JSON has no infinity: EDM's sigma_max = inf is written as a string
            "precond_kwargs": {k: (v if math.isfinite(v) else str(v)) for k, v in self.precond_kwargs.items()},
            "use_fp16": self.use_fp16,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EdmNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown EDM network config keys: {sorted(unknown)}")
        data = dict(data)
        if "precond_kwargs" in data:
            data["precond_kwargs"] = {k: float(v) for k, v in dict(data["precond_kwargs"]).items()}
        return cls(**data)


class EdmDenoiser(nn.Module):
    """An EDM network with its preconditioning, behind the project's denoiser interface.

    ``forward(x, sigma, class_labels, augment_labels)`` is EDM's D(x; sigma) (one-hot
    labels, float32). :meth:`denoise` and :meth:`denoise_labels` are the project's:
    heads ``0..K-1`` are the classes, head ``K`` is unconditional (no label for an
    unconditional network, the all-zero label for a conditional one, as EDM does when
    no label is given). The state dict has EDM's keys (``model.…``).
    """

    def __init__(self, config: EdmNetConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_classes + 1
        cls = SongUNet if config.model_type == "SongUNet" else DhariwalUNet
        self.model = cls(img_resolution=config.image_size, in_channels=config.in_channels,
                         out_channels=config.in_channels, label_dim=config.num_classes,
                         **config.full_model_kwargs())
        self.precond_params = config.full_precond_kwargs()
        if config.precond == "vp":
            p = self.precond_params
            self.sigma_min = float(vp_sigma(p["epsilon_t"], p["beta_d"], p["beta_min"]))
            self.sigma_max = float(vp_sigma(1.0, p["beta_d"], p["beta_min"]))
        else:
            self.sigma_min = self.precond_params["sigma_min"]
            self.sigma_max = self.precond_params["sigma_max"]

    def coefficients(self, sigma: torch.Tensor) -> Preconditioning:
        """The preconditioning coefficients (float32) for noise levels ``sigma``."""
        return precond_coefficients(self.config.precond, sigma.float(), self.precond_params)

    def _labels(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """One-hot (N, K) rows for integer labels; label K (unconditional) is all zeros."""
        k = self.config.num_classes
        if k == 0:
            return None
        labels = labels.to(device)
        return F.one_hot(labels.clamp(0, k), k + 1)[:, :k].float()

    def _precondition(self, x_noisy: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None,
               augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """c_skip x + c_out F(c_in x; c_noise) in float32 (autocast, if any, applies inside F)."""
        pc = self.coefficients(sigma.reshape(-1, 1, 1, 1))
        x = x_noisy.float()
        raw = self.model(pc.c_in * x, pc.c_noise.flatten(), class_labels, augment_labels)
        return pc.c_skip * x + pc.c_out * raw.float()

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """EDM's D(x; sigma): ``x`` (N, C, H, W) in [-1, 1] units plus noise, ``sigma`` (N,)
        or a scalar, ``class_labels`` (N, K) one-hot (None: the all-zero label)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(x.shape[0])
        labels = None
        if self.config.num_classes:
            if class_labels is None:
                labels = torch.zeros(x.shape[0], self.config.num_classes, device=x.device)
            else:
                labels = class_labels.float().reshape(-1, self.config.num_classes)
        return self._precondition(x, sigma, labels, augment_labels)

    def denoise(self, x_noisy: torch.Tensor, sigma: torch.Tensor,
                heads: Sequence[int] | None = None) -> torch.Tensor:
        """Denoised estimates for heads ``heads`` (default: all K+1), (N, len(heads), C, H, W).

        All heads run as one batched pass that shares the input (and so the noise).
        """
        heads = list(range(self.num_heads)) if heads is None else list(heads)
        if not heads:
            raise ValueError("no heads requested" if self.config.num_classes else
                             "an unconditional EDM network has no class heads: it cannot classify on its own "
                             "(use it as the purifier beside a class-conditional network)")
        n, m = x_noisy.shape[0], len(heads)
        sigma = sigma.reshape(-1).expand(n) if sigma.numel() in (1, n) else sigma
        if self.config.num_classes == 0:
            d = self._precondition(x_noisy, sigma, None)
            return d.unsqueeze(1).expand(n, m, *d.shape[1:]).to(x_noisy.dtype)
        labels = torch.tensor(heads, device=x_noisy.device).repeat(n)
        rep = lambda t: t.repeat_interleave(m, dim=0)  # noqa: E731  (example, head) order
        d = self._precondition(rep(x_noisy), rep(sigma), self._labels(labels, x_noisy.device))
        return d.view(n, m, *d.shape[1:]).to(x_noisy.dtype)

    def denoise_labels(self, x_noisy: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """D_{label_i}(x_i; sigma_i), one head per example, (N, C, H, W)."""
        class_labels = self._labels(labels, x_noisy.device)
        return self._precondition(x_noisy, sigma.reshape(-1), class_labels).to(x_noisy.dtype)


def build_edm_denoiser(config: EdmNetConfig | dict) -> EdmDenoiser:
    """Construct an :class:`EdmDenoiser` from a config object or its dict."""
    if isinstance(config, dict):
        config = EdmNetConfig.from_dict(config)
    return EdmDenoiser(config)


def is_edm_config(data: Any) -> bool:
    """Whether a card's ``net`` entry describes an EDM network."""
    return isinstance(data, dict) and data.get("architecture") == EDM_ARCHITECTURE


# The CIFAR-10 configurations of EDM's published checkpoints (EDM's train.py option sets
# 'ddpmpp' and 'ncsnpp' at 32x32 with augmentation; SongUNet defaults otherwise).
_DDPMPP = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
           "channel_mult_noise": 1, "resample_filter": [1, 1], "model_channels": 128, "channel_mult": [2, 2, 2],
           "dropout": 0.13, "augment_dim": 9}
_NCSNPP = {"embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
           "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1], "model_channels": 128,
           "channel_mult": [2, 2, 2], "dropout": 0.13, "augment_dim": 9}
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "cifar10-32x32-cond-vp": {"precond": "vp", "num_classes": 10, "model_kwargs": _DDPMPP},
    "cifar10-32x32-uncond-vp": {"precond": "vp", "num_classes": 0, "model_kwargs": _DDPMPP},
    "cifar10-32x32-cond-ve": {"precond": "ve", "num_classes": 10, "model_kwargs": _NCSNPP},
    "cifar10-32x32-uncond-ve": {"precond": "ve", "num_classes": 0, "model_kwargs": _NCSNPP},
}


def published_config(name: str) -> EdmNetConfig:
    """The configuration of one of EDM's published CIFAR-10 checkpoints (by file stem)."""
    stem = name.removeprefix("edm-").removesuffix(".pkl")
    if stem not in PUBLISHED_CONFIGS:
        raise ValueError(f"unknown published EDM configuration {name!r}; known: {sorted(PUBLISHED_CONFIGS)}")
    spec = PUBLISHED_CONFIGS[stem]
    return EdmNetConfig(precond=spec["precond"], model_type="SongUNet", image_size=32, in_channels=3,
                        num_classes=spec["num_classes"], model_kwargs=dict(spec["model_kwargs"]))

"""Denoising U-Nets: the multi-head network and the class-embedding variant.

Both networks share one trunk (an encoder/decoder U-Net conditioned on the noise level)
and expose the same interface, :meth:`Denoiser.denoise`, which returns EDM-preconditioned
denoised images for a chosen set of heads: classes ``0..K-1`` and the unconditional head
``K``.

* ``multihead``: one forward pass computes every head. The last decoder levels get a
  per-class branch (grouped convolutions, one group per head) so that the heads have
  room to differ; everything before is shared.
* ``embedding``: the class label (or the null label ``K``) is embedded and added to the
  noise-level embedding that modulates every residual block; evaluating K heads costs K
  batched passes.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .choices import whole_number
from .diffusion import precondition

ARCHITECTURES = ("multihead", "embedding")


@dataclass
class NetConfig:
    """Architecture hyper-parameters (stored verbatim in checkpoints)."""

    architecture: str = "multihead"
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64, 128)
    blocks_per_level: int = 1
    emb_dim: int = 128
    # multihead only: per-head widths of the class branch, one per branched decoder
    # level, from coarse to fine (the branch covers the last len(head_channels) levels).
    head_channels: tuple[int, ...] = (16, 8)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # bounds far above any network of this project (the loader compares a config with the
        # weights file's header before building the network, so these only keep configs sane)
        if not isinstance(self.channels, (list, tuple)) or not 1 <= len(self.channels) <= 6:
            raise ValueError(f"channels must list 1-6 widths, not {self.channels!r}")
        if not isinstance(self.head_channels, (list, tuple)) or len(self.head_channels) > 6:
            raise ValueError(f"head_channels must list at most 6 widths, not {self.head_channels!r}")
        self.channels = tuple(whole_number("channels", c, 1, 1024) for c in self.channels)
        self.head_channels = tuple(whole_number("head_channels", c, 1, 1024) for c in self.head_channels)
        self.image_size = whole_number("image_size", self.image_size, 4, 512)
        self.in_channels = whole_number("in_channels", self.in_channels, 1, 4)
        self.num_classes = whole_number("num_classes", self.num_classes, 0, 1000)
        self.blocks_per_level = whole_number("blocks_per_level", self.blocks_per_level, 1, 8)
        self.emb_dim = whole_number("emb_dim", self.emb_dim, 2, 2048)
        if self.emb_dim % 2:  # the noise embedding is cos and sin features, half each
            raise ValueError(f"emb_dim must be even, not {self.emb_dim}")
        if not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.image_size % (2 ** (len(self.channels) - 1)) != 0:
            raise ValueError("image_size must be divisible by 2**(levels-1)")
        if self.architecture == "multihead" and not 1 <= len(self.head_channels) <= len(self.channels):
            raise ValueError("head_channels needs 1..len(channels) entries")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown network config keys: {sorted(unknown)}")
        return cls(**data)


def _norm_groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class NoiseEmbedding(nn.Module):
    """Sinusoidal features of c_noise followed by a two-layer MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        half = dim // 2
        self.register_buffer(
            "freqs", torch.exp(-math.log(1000.0) * torch.arange(half) / half) * 100.0, persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class StreamDropout(nn.Module):
    """Dropout that draws its masks from a generator it is given (:attr:`generator`), else
    from torch's global one as ``nn.Dropout`` does.

    Training gives every dropout layer of a network the run's own generator
    (:meth:`Denoiser.set_dropout_generator`), so the masks depend on the run's seed and step
    alone, whatever else draws random numbers in the process (another thread included).
    On the CPU the masks and the result are those of ``nn.Dropout`` drawing from a global
    generator in the same state. Parameter-free: checkpoints are unchanged.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.generator is None:
            return F.dropout(x, self.p, True)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResBlock(nn.Module):
    """Pre-activation residual block with scale/shift conditioning on the embedding."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_norm_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_norm_groups(c_out), c_out)
        self.dropout = StreamDropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


def _select_heads(t: torch.Tensor, select: Sequence[int]) -> torch.Tensor:
    """Rows ``select`` of a per-head tensor (a view when they are consecutive)."""
    select = list(select)
    if select == list(range(select[0], select[0] + len(select))):
        return t[select[0]:select[0] + len(select)]
    return t[torch.tensor(select, device=t.device)]


class HeadConv(nn.Module):
    """Grouped convolution with one group per head; can evaluate a subset of heads.

    Input channels are ``heads * c_in`` (or ``c_in`` shared by all heads when
    ``shared_input``), output channels ``heads * c_out``.
    """

    def __init__(self, heads: int, c_in: int, c_out: int, kernel: int, shared_input: bool = False) -> None:
        super().__init__()
        self.heads, self.c_in, self.c_out, self.kernel = heads, c_in, c_out, kernel
        self.shared_input = shared_input
        self.weight = nn.Parameter(torch.empty(heads * c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(heads * c_out))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, select: Sequence[int] | None = None) -> torch.Tensor:
        w, b, n = self.weight, self.bias, self.heads
        if select is not None:
            w = _select_heads(w.view(n, self.c_out, self.c_in, self.kernel, self.kernel), select).flatten(0, 1)
            b = _select_heads(b.view(n, self.c_out), select).flatten()
            n = len(select)
        if self.c_out == 1 and n > 1 and not self.shared_input:
            # One output channel per head: a depthwise convolution and a sum over each
            # head's channels is the same map, and runs about 2.5x faster on CPUs than a
            # grouped convolution this narrow.
            per_channel = F.conv2d(x, w.reshape(n * self.c_in, 1, self.kernel, self.kernel), None,
                                   padding=self.kernel // 2, groups=n * self.c_in)
            out = per_channel.unflatten(1, (n, self.c_in)).sum(2)
            return out + b.view(1, n, 1, 1)
        groups = 1 if self.shared_input else n
        return F.conv2d(x, w, b, padding=self.kernel // 2, groups=groups)


class HeadNorm(nn.Module):
    """GroupNorm whose groups never straddle two heads; supports head subsets."""

    def __init__(self, heads: int, channels: int) -> None:
        super().__init__()
        self.heads, self.channels = heads, channels
        self.groups_per_head = _norm_groups(channels) // 2 or 1
        self.weight = nn.Parameter(torch.ones(heads * channels))
        self.bias = nn.Parameter(torch.zeros(heads * channels))

    def forward(self, x: torch.Tensor, select: Sequence[int] | None = None,
                scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise, then apply the affine map and (optionally) a per-example FiLM.

        ``scale``/``shift`` are (N, channels) and give ``norm(x) * (1 + scale) + shift``.
        """
        w, b, n = self.weight, self.bias, self.heads
        if select is not None:
            w = _select_heads(w.view(n, self.channels), select).flatten()
            b = _select_heads(b.view(n, self.channels), select).flatten()
            n = len(select)
        out = F.group_norm(x, n * self.groups_per_head, w, b)
        if scale is not None:
            out = torch.addcmul(shift[:, :, None, None], out, 1 + scale[:, :, None, None])
        return out


class HeadLinear(nn.Module):
    """Per-head linear map of the shared embedding (scale/shift for each head)."""

    def __init__(self, heads: int, c_in: int, c_out: int) -> None:
        super().__init__()
        self.heads, self.c_out = heads, c_out
        self.linear = nn.Linear(c_in, heads * c_out)

    def forward(self, emb: torch.Tensor, select: Sequence[int] | None = None) -> torch.Tensor:
        out = self.linear(emb).view(emb.shape[0], self.heads, self.c_out)
        if select is not None:
            out = out[:, list(select)]
        return out.flatten(1)


class HeadResBlock(nn.Module):
    """Residual block applied independently to every head's channels."""

    def __init__(self, heads: int, channels: int, emb_dim: int) -> None:
        super().__init__()
        self.channels = channels
        self.norm1 = HeadNorm(heads, channels)
        self.conv1 = HeadConv(heads, channels, channels, 3)
        self.emb = HeadLinear(heads, emb_dim, 2 * channels)
        self.norm2 = HeadNorm(heads, channels)
        self.conv2 = HeadConv(heads, channels, channels, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, select: Sequence[int] | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, select)), select)
        n = h.shape[1] // self.channels
        e = self.emb(emb, select).view(h.shape[0], n, 2, self.channels)
        scale = e[:, :, 0].reshape(h.shape[0], -1)
        shift = e[:, :, 1].reshape(h.shape[0], -1)
        h = self.norm2(h, select, scale, shift)
        h = self.conv2(F.silu(h), select)
        return x + h


class Denoiser(nn.Module):
    """U-Net denoiser with EDM preconditioning (multi-head or class-embedding).

    ``denoise(x_noisy, sigma, heads)`` returns D(x~ + s n; s) for every requested head,
    shaped (N, len(heads), C, H, W). Head ``K`` (= ``num_classes``) is unconditional.
    """

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        k = cfg.num_classes
        self.num_heads = k + 1
        self.noise_embedding = NoiseEmbedding(cfg.emb_dim)
        if cfg.architecture == "embedding":
            self.label_embedding = nn.Embedding(k + 1, cfg.emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_channels = []
        c_prev = cfg.channels[0]
        for level, c in enumerate(cfg.channels):
            blocks = nn.ModuleList()
            for _ in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c_prev, c, cfg.emb_dim, cfg.dropout))
                c_prev = c
            self.down.append(blocks)
            skip_channels.append(c)
            if level < len(cfg.channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(c_prev, c_prev, cfg.emb_dim, cfg.dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.channels))):
            c = cfg.channels[level]
            blocks = nn.ModuleList()
            for i in range(cfg.blocks_per_level):
                blocks.append(ResBlock(c_prev + (skip_channels[level] if i == 0 else 0), c, cfg.emb_dim, cfg.dropout))
                c_prev = c
            self.up.append(blocks)
        if cfg.architecture == "multihead":
            heads = self.num_heads
            n_branch = len(cfg.head_channels)
            self.branch_levels = list(range(len(cfg.channels) - n_branch, len(cfg.channels)))
            self.branch_in = nn.ModuleList()
            self.branch_carry = nn.ModuleList()
            self.branch_blocks = nn.ModuleList()
            for j, hc in enumerate(cfg.head_channels):
                trunk_c = cfg.channels[len(cfg.channels) - 1 - self.branch_levels[j]]
                self.branch_in.append(HeadConv(heads, trunk_c, hc, 1, shared_input=True))
                if j > 0:
                    self.branch_carry.append(HeadConv(heads, cfg.head_channels[j - 1], hc, 1))
                self.branch_blocks.append(HeadResBlock(heads, hc, cfg.emb_dim))
            self.out_norm = HeadNorm(heads, cfg.head_channels[-1])
            self.conv_out = HeadConv(heads, cfg.head_channels[-1], cfg.in_channels, 3)
        else:
            self.out_norm = nn.GroupNorm(_norm_groups(c_prev), c_prev)
            self.conv_out = nn.Conv2d(c_prev, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # -- raw network F -------------------------------------------------------------
    def set_dropout_generator(self, generator: torch.Generator | None) -> None:
        """Draw every dropout mask from ``generator`` (None: torch's global generator)."""
        for module in self.modules():
            if isinstance(module, StreamDropout):
                module.generator = generator

    def _trunk(self, x: torch.Tensor, emb: torch.Tensor):
        h = self.conv_in(x)
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid(h, emb)
        for i, blocks in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = torch.cat([h, skips[len(skips) - 1 - i]], dim=1)
            for block in blocks:
                h = block(h, emb)
            yield i, h

    def forward_raw(
        self, x_in: torch.Tensor, c_noise: torch.Tensor, heads: Sequence[int] | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output F for the given heads, shaped (N, H, C, h, w).

        For the multi-head net ``heads`` selects head indices (None = all K+1). For the
        embedding net pass ``labels`` (N,) instead; the output has one head.
        """
        emb = self.noise_embedding(c_noise)
        n = x_in.shape[0]
        if self.config.architecture == "embedding":
            if labels is None:
                raise ValueError("the class-embedding network needs labels")
            emb = emb + self.label_embedding(labels)
            h = None
            for _, h in self._trunk(x_in, emb):
                pass
            out = self.conv_out(F.silu(self.out_norm(h)))
            return out.unsqueeze(1)
        select = None if heads is None or list(heads) == list(range(self.num_heads)) else list(heads)
        branch = None
        j = 0
        for i, h in self._trunk(x_in, emb):
            if i not in self.branch_levels:
                continue
            inp = self.branch_in[j](h, select)
            if branch is not None:
                up = F.interpolate(branch, scale_factor=2.0, mode="nearest")
                inp = inp + self.branch_carry[j - 1](up, select)
            branch = self.branch_blocks[j](inp, emb, select)
            j += 1
        out = self.conv_out(F.silu(self.out_norm(branch, select)), select)
        return out.view(n, -1, self.config.in_channels, *out.shape[-2:])

    # -- preconditioned denoiser D ---------------------------------------------------
    def denoise(
        self, x_noisy: torch.Tensor, sigma: torch.Tensor, heads: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Denoised estimates D_h(x_noisy; sigma) for heads ``heads`` (default: all K+1).

        Parameters
        ----------
        x_noisy : (N, C, H, W) tensor in x~ units (already noised).
        sigma : (N,) tensor of noise levels.
        heads : head indices; ``num_classes`` is the unconditional head.

        Returns
        -------
        (N, len(heads), C, H, W) tensor.
        """
        heads = list(range(self.num_heads)) if heads is None else list(heads)
        pc = precondition(sigma)
        c_in = pc.c_in.view(-1, 1, 1, 1)
        x_in = x_noisy * c_in
        if self.config.architecture == "embedding":
            n = x_noisy.shape[0]
            m = len(heads)
            labels = torch.tensor(heads, device=x_noisy.device).repeat(n)
            rep = lambda t: t.repeat_interleave(m, dim=0)  # noqa: E731
            raw = self.forward_raw(rep(x_in), rep(pc.c_noise), labels=labels)
            raw = raw.view(n, m, *raw.shape[2:])
        else:
            raw = self.forward_raw(x_in, pc.c_noise, heads=heads)
        c_skip = pc.c_skip.view(-1, 1, 1, 1, 1)
        c_out = pc.c_out.view(-1, 1, 1, 1, 1)
        return c_skip * x_noisy.unsqueeze(1) + c_out * raw.to(x_noisy.dtype)

    def denoise_labels(self, x_noisy: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """D_{label_i}(x_i; sigma_i) for one head per example, shaped (N, C, H, W) (training)."""
        pc = precondition(sigma)
        x_in = x_noisy * pc.c_in.view(-1, 1, 1, 1)
        if self.config.architecture == "embedding":
            raw = self.forward_raw(x_in, pc.c_noise, labels=labels)[:, 0]
        else:
            raw_all = self.forward_raw(x_in, pc.c_noise)
            raw = raw_all[torch.arange(x_noisy.shape[0], device=x_noisy.device), labels]
        return pc.c_skip.view(-1, 1, 1, 1) * x_noisy + pc.c_out.view(-1, 1, 1, 1) * raw.to(x_noisy.dtype)


def build_denoiser(config: NetConfig | dict) -> Denoiser:
    """Construct a denoiser from a config object or dict."""
    if isinstance(config, dict):
        config = NetConfig.from_dict(config)
    return Denoiser(config)


def grow_denoiser(source: Denoiser, blocks_per_level: int, seed: int = 0) -> Denoiser:
    """A deeper copy of ``source`` that computes exactly the same function.

    Every resolution gets ``blocks_per_level`` residual blocks (at least the source's).
    The source's blocks keep their weights and places; each added block comes after them
    at its level, is freshly initialised (from ``seed``) and has its last convolution
    zeroed, so it starts as the identity and training grows it from there. This lets a
    larger network be fine-tuned from a trained smaller one instead of from scratch.
    """
    cfg = source.config
    if blocks_per_level < cfg.blocks_per_level:
        raise ValueError(f"cannot grow {cfg.blocks_per_level} blocks per level to {blocks_per_level}")
    grown_cfg = NetConfig.from_dict({**cfg.to_dict(), "blocks_per_level": blocks_per_level})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = Denoiser(grown_cfg)
    # block i of a level has the same name in both, so only the added blocks are missing
    _, unexpected = grown.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        for blocks in (*grown.down, *grown.up):
            for block in list(blocks)[cfg.blocks_per_level:]:
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
    return grown.to(next(source.parameters()).device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

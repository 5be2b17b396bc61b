"""A small discriminative CNN: the baseline for side-by-side comparison and transfer attacks."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .data import TensorDataset, check_image_batch
from .models import (CNN_FORMAT, CheckpointError, check_card_matches_weights, checkpoint_path, is_cnn_card,
                     read_json_object, save_weights_and_card)


class SmallCNN(nn.Module):
    """conv(32)-conv(64)-pool-conv(128)-pool-fc(256)-fc(K); input [0, 1] NCHW, output logits."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * (image_size // 4) ** 2, 256), nn.ReLU(),
                                  nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_batch(x, self.in_channels, self.image_size)
        return self.head(self.features(x * 2 - 1))


@dataclass(frozen=True)
class CNNTrainStep:
    step: int
    total_steps: int
    epoch: float
    loss: float
    accuracy: float
    elapsed_seconds: float


def train_cnn(dataset: TensorDataset, epochs: float = 3.0, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
              log_every: int = 50, cancelled: Callable[[], bool] = lambda: False) -> Iterator[CNNTrainStep]:
    """Train a :class:`SmallCNN` with Adam (cosine learning rate); yields step records.

    The trained model is the generator's return value.
    """
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = SmallCNN(dataset.images.shape[1], len(dataset.classes), dataset.images.shape[-1])
    torch.random.set_rng_state(state)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(dataset)
    per_epoch = max(1, n // batch_size)  # a set smaller than a batch is one (smaller) batch
    total = max(1, math.ceil(epochs * per_epoch))  # as rdc train: any positive epochs take a step
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    start = time.perf_counter()
    perm = torch.randperm(n, generator=gen)
    loss_acc = correct = seen = 0.0
    for step in range(total):
        if cancelled():
            return None
        pos = step % per_epoch
        if pos == 0 and step > 0:
            perm = torch.randperm(n, generator=gen)
        idx = perm[pos * batch_size:(pos + 1) * batch_size]
        x = dataset.images[idx].float() / 255
        y = dataset.labels[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_acc += float(loss.detach()) * len(y)
        correct += float((logits.argmax(1) == y).sum())
        seen += len(y)
        if (step + 1) % log_every == 0 or step + 1 == total:
            yield CNNTrainStep(step + 1, total, (step + 1) / per_epoch, loss_acc / seen, correct / seen,
                               time.perf_counter() - start)
            loss_acc = correct = seen = 0.0
    return model.eval()


def save_cnn(path: str | Path, model: SmallCNN, card: dict[str, Any]) -> Path:
    """Weights as safetensors + a JSON card beside them (format ``rdc-studio/cnn``)."""
    path = Path(path).with_suffix(".safetensors")
    card = dict(card, format=CNN_FORMAT, in_channels=model.in_channels, num_classes=model.num_classes,
                image_size=model.image_size)
    card.setdefault("name", path.stem)
    card.setdefault("classes", [str(i) for i in range(model.num_classes)])
    return save_weights_and_card(path, model.state_dict(), card)


def is_cnn_checkpoint(name_or_path: str | Path | None) -> bool:
    """Whether a bundled name or path names a CNN baseline checkpoint (by its card)."""
    if name_or_path is None:
        return False
    return is_cnn_card(cnn_weights_path(name_or_path))


def cnn_weights_path(name_or_path: str | Path = "mnist-cnn") -> Path:
    """The weights file of a CNN checkpoint given by bundled name or path (not checked; the
    rule of :func:`core.models.checkpoint_path`)."""
    return checkpoint_path(name_or_path)[0]


def load_cnn(name_or_path: str | Path = "mnist-cnn", device: str | torch.device = "cpu") -> tuple[SmallCNN, dict]:
    """Load a CNN checkpoint (bundled name or path); clear errors for bad files."""
    p = cnn_weights_path(name_or_path)
    if not p.exists():
        raise CheckpointError(f"{p}: CNN checkpoint not found")
    if not p.is_file():
        raise CheckpointError(f"{p}: the CNN checkpoint is not a regular file")
    card = read_json_object(p.with_suffix(".json"), "CNN's model card", CheckpointError)
    check_card_matches_weights(p, card)
    if card.get("format") != CNN_FORMAT:
        raise CheckpointError(f"{p}: not a CNN checkpoint (format {card.get('format')!r})")
    shape = {key: card.get(key) for key in ("in_channels", "num_classes", "image_size")}
    bounds = {"in_channels": (1, 4), "num_classes": (1, 1000), "image_size": (4, 512)}
    for key, value in shape.items():
        lo, hi = bounds[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise CheckpointError(f"{p}: the CNN card lacks or mangles its shape ({key} {value!r}, not {lo}-{hi})")
    model = SmallCNN(shape["in_channels"], shape["num_classes"], shape["image_size"])
    card.setdefault("classes", [str(i) for i in range(model.num_classes)])  # cards written before classes were
    classes = card["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{p}: the card's classes must be a list of names, not {classes!r:.80}")
    if len(classes) != model.num_classes:
        raise CheckpointError(f"{p}: the card names {len(classes)} classes for {model.num_classes} outputs")
    try:
        tensors = load_file(str(p))
        model.load_state_dict(tensors)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{p}: weights do not match a SmallCNN ({exc})") from exc
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise CheckpointError(f"{p}: tensor {key!r} is not finite floating-point ({tensor.dtype})")
    model.eval().to(device)
    for q in model.parameters():
        q.requires_grad_(False)
    return model, card

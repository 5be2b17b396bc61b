"""Training of the denoisers with the EDM loss: a resumable generator of step records."""
from __future__ import annotations

import copy
import json
import math
import platform
import reprlib
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from .data import TensorDataset
from .diffusion import (P_MEAN, P_STD, log_normal_density, log_weight_density, loss_weight, precondition,
                        sample_training_sigmas, to_model_space)
from .models import atomic_save_tensors, atomic_write_json, read_json_object, save_checkpoint
from .nets import Denoiser, NetConfig, build_denoiser, count_parameters


@dataclass
class TrainConfig:
    """Optimisation settings (stored in the run directory and the model card)."""

    epochs: float = 10.0
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 500
    # "constant" after the warm-up, or "cosine": half a cosine from lr down to 0 at the last step
    lr_schedule: str = "constant"
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    uncond_prob: float = 0.1  # embedding net: label dropout to learn the unconditional head
    # bfloat16 autocast: a large speed-up on GPUs and CPUs with AMX/AVX512-BF16, a large
    # slow-down on CPUs without them (emulated), so it is opt-in.
    bf16: bool = False
    seed: int = 0
    checkpoint_minutes: float = 5.0
    threads: int = 0  # 0 = leave torch's default
    max_minutes: float = 0.0  # > 0: stop after this wall time and write the final model
    # Hybrid objective: weight of the cross-entropy of the diffusion classifier's own
    # logits (a one-level unbiased estimate of the test-time ELBO logits), 0 = purely
    # generative training. See :func:`classifier_cross_entropy`.
    ce_weight: float = 0.0
    ce_weighting: str = "edm"
    ce_sigma_min: float = 0.1
    ce_sigma_max: float = 10.0
    # Training noise levels: ln sigma ~ N(p_mean, p_std^2). EDM's (-1.2, 1.2) puts 3% of
    # the draws above sigma = 2.9, where the diffusion classifier's levels are most accurate;
    # a larger p_mean trains those levels more at the expense of the finest ones.
    p_mean: float = P_MEAN
    p_std: float = P_STD

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if not self.p_std > 0:
            raise ValueError(f"p_std must be positive, not {self.p_std}")


@dataclass(frozen=True)
class TrainStep:
    """One logged training step."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    images_per_second: float
    lr: float
    elapsed_seconds: float
    checkpointed: bool = False
    ce_loss: float = 0.0  # mean cross-entropy term (hybrid objective), 0 when not used
    train_accuracy: float = float("nan")  # accuracy of the one-level logit estimates


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay warmed up as (1 + step) / (10 + step) so early weights fade quickly."""
    return min(decay, (1.0 + step) / (10.0 + step))


@dataclass
class LossParts:
    """The terms of one training loss evaluation (tensors keep their graph)."""

    total: torch.Tensor
    denoising: torch.Tensor
    cross_entropy: torch.Tensor | None = None
    correct: int = 0
    counted: int = 0


def classifier_cross_entropy(
    errors: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, weighting: str,
    sigma_min: float, sigma_max: float, p_mean: float = P_MEAN, p_std: float = P_STD,
) -> tuple[torch.Tensor | None, int, int]:
    """Cross-entropy of the one-level estimate of the diffusion classifier's logits.

    The classifier's logit is logit_y = -int w(s) ||D_y(x~ + s n; s) - x~||^2 d ln s over
    [sigma_min, sigma_max]. With s drawn from the training density p_train, the
    importance-weighted single draw -w(s)/p_train(s) * err_y(s) is an unbiased estimate of
    it (for ``edm`` the ratio is exactly lambda(s)); its cross-entropy with the label
    pushes the class heads apart exactly where the classifier reads them.

    Parameters
    ----------
    errors : (N, K) squared errors summed over pixels, one noise draw per example.
    sigma : (N,) the draw's noise levels.
    p_mean, p_std : the training density of ln sigma the draws came from.

    Returns
    -------
    (mean cross-entropy or None when no draw fell in the range, correct, counted)
    """
    inside = (sigma >= sigma_min) & (sigma <= sigma_max)
    if not bool(inside.any()):
        return None, 0, 0
    log_s = sigma[inside].double().log()
    log_ratio = torch.from_numpy(log_weight_density(log_s.cpu().numpy(), weighting)).to(errors.device)
    log_ratio = log_ratio - log_normal_density(log_s, p_mean, p_std).to(errors.device)
    logits = -log_ratio.exp().float().unsqueeze(1) * errors[inside]
    ce = torch.nn.functional.cross_entropy(logits, labels[inside])
    correct = int((logits.detach().argmax(1) == labels[inside]).sum())
    return ce, correct, int(inside.sum())


def diffusion_loss(net: Denoiser, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                   uncond_prob: float = 0.1, config: "TrainConfig | None" = None) -> LossParts:
    """EDM loss on each example's class head and on the unconditional head.

    With ``config.ce_weight > 0`` (multi-head only) adds the cross-entropy of the
    classifier's one-level logit estimate (:func:`classifier_cross_entropy`), computed
    from the same forward pass: every head is evaluated anyway.

    Parameters
    ----------
    x : (N, C, H, W) images in [0, 1].
    labels : (N,) class indices.
    """
    n = x.shape[0]
    k = net.config.num_classes
    x0 = to_model_space(x)
    p_mean = config.p_mean if config is not None else P_MEAN
    p_std = config.p_std if config is not None else P_STD
    sigma = sample_training_sigmas(n, generator, x.device, p_mean, p_std)
    noise = torch.randn(x0.shape, generator=generator).to(x.device)
    x_noisy = x0 + sigma.view(-1, 1, 1, 1) * noise
    w = loss_weight(sigma)
    ce_weight = config.ce_weight if config is not None else 0.0
    if net.config.architecture == "multihead":
        pc = precondition(sigma)
        raw = net.forward_raw(x_noisy * pc.c_in.view(-1, 1, 1, 1), pc.c_noise).float()
        idx = torch.arange(n, device=x.device)
        if ce_weight <= 0:  # only the example's class head and the unconditional head are needed
            raw = torch.stack([raw[idx, labels], raw[:, k]], dim=1)
        d = pc.c_skip.view(-1, 1, 1, 1, 1) * x_noisy.unsqueeze(1) + pc.c_out.view(-1, 1, 1, 1, 1) * raw
        sq = (d - x0.unsqueeze(1)).pow(2).flatten(2)  # (N, heads, pixels)
        if ce_weight <= 0:
            denoising = (w * (sq[:, 0].mean(1) + sq[:, 1].mean(1))).mean()
            return LossParts(denoising, denoising)
        denoising = (w * (sq[idx, labels].mean(1) + sq[:, k].mean(1))).mean()
        ce, correct, counted = classifier_cross_entropy(
            sq[:, :k].sum(2), sigma, labels, config.ce_weighting, config.ce_sigma_min, config.ce_sigma_max,
            p_mean, p_std)
        if ce is None:
            return LossParts(denoising, denoising)
        return LossParts(denoising + ce_weight * ce, denoising, ce, correct, counted)
    if ce_weight > 0:
        raise ValueError("the cross-entropy term needs the multi-head network (one pass for all classes)")
    drop = torch.rand(n, generator=generator).to(x.device) < uncond_prob
    lab = torch.where(drop, torch.full_like(labels, k), labels)
    d = net.denoise_labels(x_noisy, sigma, lab).float()
    err = (d - x0).pow(2).mean(dim=(1, 2, 3))
    denoising = (w * err).mean()
    return LossParts(denoising, denoising)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then constant or cosine to 0."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class DropoutRng:
    """A run's own generator for its dropout masks, on the run's device.

    It starts from the run's seed and is given to the network's dropout layers
    (:meth:`~rdc_studio.core.nets.Denoiser.set_dropout_generator`), so the masks depend on
    the seed and the step alone (not on whatever else draws random numbers, in this thread
    or another), and its state is saved with the run's, so a resumed run continues it
    exactly. A CPU run's masks are those of the runs that swapped this state into torch's
    global generator around each step (saved as ``rng_dropout`` too): old runs resume as
    they would have.
    """

    SALT = 0x6A09E667F3BCC908  # keeps these streams apart from the noise generator's (same seed)

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.key = "rng_dropout_cuda" if device.type == "cuda" else "rng_dropout"
        self.generator = torch.Generator(device=device).manual_seed((seed ^ self.SALT) % 2**64)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state as a run's state tensor."""
        return {self.key: self.generator.get_state()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Continue from a saved state, where the run's state holds one for this device (a
        run saved before it was saved, or on another kind of device, starts it afresh)."""
        if self.key in tensors:
            self.generator.set_state(tensors[self.key])


DROPOUT_RNG_KEYS = ("rng_dropout", "rng_dropout_cuda")
"""State tensors of :class:`DropoutRng`; optional (a run saved before them, or on another device)."""
STATE_METADATA_KEY = "rdc_run_state"
"""The ``state.safetensors`` metadata entry that holds the run state saved with the tensors (JSON)."""


def _save_state(run_dir: Path, net, ema, opt, gen: torch.Generator, dropout_rng: DropoutRng, step: int,
                wall: float, meta: dict) -> None:
    """Write ``state.safetensors`` (the tensors, with the run state as metadata) and then
    ``state.json`` (a readable copy of that state); a ``save_id`` ties the two together."""
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"opt.{pid}.{key}"] = val.reshape(-1) if val.dim() == 0 else val
    tensors["rng"] = gen.get_state()
    tensors.update(dropout_rng.tensors())
    state = dict(meta, step=step, wall_seconds=wall, param_groups=opt_state["param_groups"],
                 save_id=uuid.uuid4().hex)
    # each file is replaced atomically, the pair is not: see _read_state for an interruption between them
    atomic_save_tensors(run_dir / "state.safetensors", tensors, metadata={STATE_METADATA_KEY: json.dumps(state)})
    atomic_write_json(run_dir / "state.json", state)


STATE_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "net": (dict, "an object"), "train": (dict, "an object"), "step": (int, "a whole number"),
    "wall_seconds": ((int, float), "a number"), "param_groups": (list, "a list"),
}
"""The keys a run's ``state.json`` must have, with their types (a bool is none of them)."""


def _few(keys: list[str]) -> str:
    """The first keys of a list, and how many there are when more."""
    return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")


def _read_state_json(run_dir: Path) -> dict[str, Any]:
    """A run's ``state.json``, with :data:`STATE_KEYS` checked.

    Raises
    ------
    ValueError
        Naming the file, when it is unreadable, not a JSON object, or lacks a key or has one
        of another type (or a negative step or time).
    """
    path = run_dir / "state.json"
    return _check_state(read_json_object(path, "run state"), path)


def _check_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """``state`` (read from ``path``) after checking :data:`STATE_KEYS` (ValueError naming ``path``)."""
    for key, (types, kind) in STATE_KEYS.items():
        if key not in state:
            raise ValueError(f"{path}: not a run state: it lacks {key!r}")
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise ValueError(f"{path}: {key!r} must be {kind}, not {reprlib.repr(state[key])}")
    if state["step"] < 0 or not 0 <= state["wall_seconds"] < math.inf:
        raise ValueError(f"{path}: 'step' and 'wall_seconds' must be at least 0, not "
                         f"{state['step']} and {state['wall_seconds']}")
    return state


def _read_state_tensors(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A run's ``state.safetensors``: its tensors, and the run state saved with them (checked as
    :func:`_read_state_json` does; None in a file written before they carried it).

    Raises
    ------
    ValueError
        Naming the file, when it is missing or unreadable, or its run state is not valid.
    """
    from safetensors import SafetensorError, safe_open

    path = run_dir / "state.safetensors"
    if not path.exists():
        raise ValueError(f"{path}: missing; the run's state.json needs it to resume")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    if STATE_METADATA_KEY not in metadata:
        return tensors, None
    try:
        state = json.loads(metadata[STATE_METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}: the run state saved with the tensors is not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: the run state saved with the tensors is not a JSON object")
    return tensors, _check_state(state, path)


def _describe_save(state: dict[str, Any] | None) -> str:
    if state is None:
        return "a save that records no run state"
    run = state.get("run_id")
    return f"{'run ' + str(run)[:8] if isinstance(run, str) else 'a run'} at step {state['step']}"


def _read_state(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """A run's saved state: ``state.json`` and the ``state.safetensors`` of the same save.

    Each save writes the tensors (with the run state in their metadata) and then
    ``state.json``, both with the same ``save_id``. When an interruption came between the
    two, the tensors are newer than ``state.json`` (the same ``run_id``, a later step): the
    state saved with them is used. Files written before the ``save_id`` (no id in
    ``state.json``, no state in the tensors) are taken as a pair, as they always were.

    Returns
    -------
    (the run state, the tensors, the file the state was read from)

    Raises
    ------
    ValueError
        Naming the file, when one is unreadable or invalid, or the two are not of one save
        of one run (a ``state.safetensors`` copied from another run, or an older one).
    """
    json_path, tensors_path = run_dir / "state.json", run_dir / "state.safetensors"
    state = _read_state_json(run_dir)
    tensors, saved = _read_state_tensors(run_dir)
    if saved is None and state.get("save_id") is None:
        return state, tensors, json_path
    if saved is not None and saved.get("save_id") is not None and saved.get("save_id") == state.get("save_id"):
        return state, tensors, json_path
    if (saved is not None and state.get("run_id") is not None and saved.get("run_id") == state.get("run_id")
            and saved["step"] >= state["step"]):
        return saved, tensors, tensors_path  # state.json was not rewritten after these tensors
    raise ValueError(f"{tensors_path}: not saved together with {json_path.name}: it holds "
                     f"{_describe_save(saved)}, state.json {_describe_save(state)} (a file copied from another "
                     f"run or an earlier save); put back the pair of one save, or use a new --out")


ADAM_UPDATE_KEYS = {"betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"}
"""The optimizer-group settings that change Adam's update (a resumed run must keep them)."""


def _load_state(run_dir: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor], net: Denoiser,
                ema: Denoiser, opt: torch.optim.Optimizer, gen: torch.Generator, dropout_rng: DropoutRng,
                state_path: Path | None = None) -> None:
    """Load a run's checked state (:func:`_read_state`, read from ``state_path``, by default
    ``state.json``) into a new run's objects, after checking that every tensor and optimizer
    group fits them. The dropout generators' states are optional: a run saved before they were
    saved resumes with them as a new run starts them; a CUDA one is used only on CUDA.

    Raises
    ------
    ValueError
        Naming the file, when a tensor is missing, unexpected or of another shape or dtype, or
        ``param_groups`` is not this optimizer's.
    """
    params = list(net.parameters())
    expected = {f"model.{k}": v for k, v in net.state_dict().items()}
    expected.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    expected["rng"] = gen.get_state()
    opt_ids = {k.split(".")[1] for k in tensors if k.startswith("opt.")}  # the parameters Adam has stepped
    for pid in opt_ids & {str(i) for i in range(len(params))}:
        p = params[int(pid)]
        expected.update({f"opt.{pid}.step": torch.zeros(1), f"opt.{pid}.exp_avg": p, f"opt.{pid}.exp_avg_sq": p})
    optional = dropout_rng.tensors()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys() - set(DROPOUT_RNG_KEYS))
    expected.update({k: v for k, v in optional.items() if k in tensors})
    mismatched = sorted(k for k in expected.keys() & tensors.keys()
                        if (tensors[k].shape, tensors[k].dtype) != (expected[k].shape, expected[k].dtype))
    problems = [f"{what} {_few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                          ("of another shape or dtype", mismatched)) if keys]
    if problems:
        raise ValueError(f"{run_dir / 'state.safetensors'}: its tensors do not fit this network and optimizer: "
                         f"{'; '.join(problems)}")
    state_path = state_path or run_dir / "state.json"
    fresh = json.loads(json.dumps(opt.state_dict()["param_groups"]))  # tuples as JSON lists
    saved = state["param_groups"]
    if len(saved) != len(fresh) or not all(isinstance(g, dict) for g in saved):
        raise ValueError(f"{state_path}: 'param_groups' must be {len(fresh)} object(s), "
                         f"not {reprlib.repr(saved)}")
    for i, (group, ref) in enumerate(zip(saved, fresh)):
        lr = group.get("lr", ref["lr"])  # set every step; the other settings are Adam's defaults
        # only the settings of the update itself; implementation flags (foreach, fused, ...) may differ
        # between the torch versions and devices a run is saved and resumed on
        bad = sorted(k for k in group.keys() & ref.keys() & (ADAM_UPDATE_KEYS | {"params"}) if group[k] != ref[k])
        bad += [] if isinstance(lr, (int, float)) and not isinstance(lr, bool) else ["lr"]
        if bad:
            raise ValueError(f"{state_path}: param_groups[{i}] does not fit this optimizer (Adam "
                             f"with its default update and a numeric lr) in {_few(bad)}")
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, key = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[key] = v.reshape(()) if key == "step" else v
    # keys a group saved by an older torch lacks take this one's defaults
    opt.load_state_dict({"state": opt_state, "param_groups": [dict(ref, **g) for ref, g in zip(fresh, saved)]})
    gen.set_state(tensors["rng"])
    dropout_rng.load(tensors)


RESUME_FIXED = ("batch_size", "seed", "dataset", "split", "examples")
"""What a resumed run must share with its state: a step's and an epoch's meaning and the data order."""
RUN_CONTROL = ("threads", "checkpoint_minutes", "max_minutes")
"""Training settings that do not change the result (how a run is executed)."""


def _new_run(net_config: NetConfig, cfg: TrainConfig, device: str | torch.device = "cpu",
             init_from: Denoiser | None = None
             ) -> tuple[Denoiser, Denoiser, torch.optim.Adam, torch.Generator, DropoutRng]:
    """A run's network (seeded, or ``init_from``'s weights), its EMA copy, optimizer, noise
    generator and dropout generators."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)  # parameter initialisation only; restored below
    net = build_denoiser(net_config).to(device)
    torch.random.set_rng_state(torch_state)
    if init_from is not None:
        net.load_state_dict(init_from.state_dict())
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    dropout_rng = DropoutRng(cfg.seed, device)
    net.set_dropout_generator(dropout_rng.generator)  # after the copy: the EMA network never trains
    return net, ema, torch.optim.Adam(net.parameters(), lr=cfg.lr), gen, dropout_rng


def _resume(run_dir: Path, net_config: NetConfig, train_config: TrainConfig, dataset: TensorDataset,
            net: Denoiser, ema: Denoiser, opt: torch.optim.Optimizer, gen: torch.Generator,
            dropout_rng: DropoutRng) -> tuple[list[str], dict[str, Any], Path]:
    """Check a run's saved state against these settings and load it into a new run's objects.

    Returns
    -------
    (the changed settings, as :func:`check_resume` gives them; the saved state; the file it
    was read from, as :func:`_read_state` gives them)
    """
    prev, tensors, state_path = _read_state(run_dir)
    if prev["net"] != json.loads(json.dumps(net_config.to_dict())):
        raise ValueError(f"{run_dir}: existing run has a different network config; use a new --out")
    old = dict(prev["train"], dataset=prev.get("dataset"), split=prev.get("split"), examples=prev.get("examples"))
    new = dict(asdict(train_config), dataset=dataset.name, split=dataset.split, examples=len(dataset))
    refused, changed = [], []
    for key, value in new.items():
        if key in RUN_CONTROL or old.get(key) is None or old[key] == value:
            continue
        (refused if key in RESUME_FIXED else changed).append(f"{key.replace('_', ' ')}: {old[key]} -> {value}")
    if refused:
        raise ValueError(f"{run_dir}: a resumed run keeps its data and batches, but these differ: "
                         f"{'; '.join(refused)}; use the run's settings, or a new --out (with --init-from "
                         f"to start from its model)")
    _load_state(run_dir, prev, tensors, net, ema, opt, gen, dropout_rng, state_path)
    return changed, prev, state_path


def check_resume(run_dir: str | Path, net_config: NetConfig, train_config: TrainConfig,
                 dataset: TensorDataset) -> list[str]:
    """Whether a run started in ``run_dir`` can resume with these settings, and what changes.

    Reads and checks the whole saved state (by loading it into a new network and optimizer),
    so that a run that :func:`train` cannot resume fails here, before anything is written.

    Returns ``name: old -> new`` texts of the optimisation settings a resumed run changes
    (a new schedule from the saved step on; the card records the new ones); empty for a
    new run.

    Raises
    ------
    ValueError
        When the network differs, or a setting that fixes the data and the batches
        (:data:`RESUME_FIXED`; checked where the state records it), or, naming the file,
        when ``state.json`` or ``state.safetensors`` is unreadable or does not fit, or the two
        are not of one save (:func:`_read_state`).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").exists():
        return []
    return _resume(run_dir, net_config, train_config, dataset, *_new_run(net_config, train_config))[0]


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's data order (as before for every seed torch takes unchanged;
    a larger product wraps into torch's 64 bits)."""
    value = seed * 100003 + epoch
    return value if -2**63 <= value < 2**64 else value % 2**64


def train(
    dataset: TensorDataset,
    net_config: NetConfig,
    train_config: TrainConfig,
    run_dir: str | Path,
    card_extra: dict[str, Any] | None = None,
    log_every: int = 50,
    should_stop: Callable[[], bool] | None = None,
    device: str | torch.device = "cpu",
    init_from: Denoiser | None = None,
    init_name: str | None = None,
) -> Iterator[TrainStep]:
    """Train a denoiser, yielding a :class:`TrainStep` every ``log_every`` steps.

    Resumes from ``run_dir/state.*`` when present (the same network, data and batches
    required: :func:`check_resume`; a changed schedule continues from the saved step). Writes a
    checkpoint every ``checkpoint_minutes`` and, at the end, the EMA weights in the
    bundled format as ``run_dir/model.safetensors`` + ``model.json``.

    ``init_from`` (fine-tuning) starts a new run from that denoiser's weights, for both
    the trained and the EMA copy; its config must equal ``net_config``. ``init_name``
    (the checkpoint it came from) is recorded in the run and the model card.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = train_config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    meta = {"net": net_config.to_dict(), "train": asdict(cfg), "dataset": dataset.name, "split": dataset.split,
            "examples": len(dataset)}
    if init_from is not None:
        if json.loads(json.dumps(init_from.config.to_dict())) != json.loads(json.dumps(net_config.to_dict())):
            raise ValueError(f"--init-from {init_name or 'model'}: its network config "
                             f"{init_from.config.to_dict()} differs from the requested {net_config.to_dict()}")
        meta["init_from"] = init_name or "model"
    net, ema, opt, gen, dropout_rng = _new_run(net_config, cfg, device, init_from)
    step, wall = 0, 0.0
    if (run_dir / "state.json").exists():  # checked and loaded before anything is written
        _, prev, state_path = _resume(run_dir, net_config, cfg, dataset, net, ema, opt, gen, dropout_rng)
        step, wall = prev["step"], float(prev["wall_seconds"])
        if state_path.name != "state.json":  # an interrupted save: its readable copy, as it should have been
            atomic_write_json(run_dir / "state.json", prev)
        # a run saved before runs had an id gets one
        meta["run_id"] = prev["run_id"] if isinstance(prev.get("run_id"), str) else uuid.uuid4().hex
    else:
        meta["run_id"] = uuid.uuid4().hex
        atomic_write_json(run_dir / "config.json", meta)
    n = len(dataset)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total_steps = int(math.ceil(cfg.epochs * steps_per_epoch))
    images = dataset.images
    labels = dataset.labels
    # the permutation position is derived from the step so resume continues the epoch
    perm_epoch = step // steps_per_epoch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, perm_epoch)))
    last_ckpt = time.perf_counter()
    t_log, imgs_since = time.perf_counter(), 0
    start = time.perf_counter() - wall
    loss_acc, loss_n = 0.0, 0
    ce_acc, correct_acc, counted_acc = 0.0, 0, 0
    net.train()
    while step < total_steps:
        if cfg.max_minutes > 0 and time.perf_counter() - start > cfg.max_minutes * 60:
            _save_state(run_dir, net, ema, opt, gen, dropout_rng, step, time.perf_counter() - start, meta)
            break
        if should_stop is not None and should_stop():
            _save_state(run_dir, net, ema, opt, gen, dropout_rng, step, time.perf_counter() - start, meta)
            return
        epoch_idx, pos = divmod(step, steps_per_epoch)
        if epoch_idx != perm_epoch:
            perm_epoch = epoch_idx
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, perm_epoch)))
        idx = perm[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        x = images[idx].to(device).float() / 255.0
        y = labels[idx].to(device)
        lr = lr_at(step, total_steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu" if str(device) == "cpu" else "cuda", dtype=torch.bfloat16, enabled=cfg.bf16):
            parts = diffusion_loss(net, x, y, gen, cfg.uncond_prob, cfg)
        loss = parts.total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        decay = ema_decay_at(step, cfg.ema_decay)
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - decay)
        step += 1
        loss_acc += float(loss.detach())
        loss_n += 1
        if parts.cross_entropy is not None:
            ce_acc += float(parts.cross_entropy.detach()) * parts.counted
        correct_acc += parts.correct
        counted_acc += parts.counted
        imgs_since += x.shape[0]
        checkpointed = False
        if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60 or step == total_steps:
            _save_state(run_dir, net, ema, opt, gen, dropout_rng, step, time.perf_counter() - start, meta)
            last_ckpt = time.perf_counter()
            checkpointed = True
        if step % log_every == 0 or step == total_steps or checkpointed:
            now = time.perf_counter()
            yield TrainStep(step, total_steps, step / steps_per_epoch, loss_acc / loss_n,
                            imgs_since / max(now - t_log, 1e-9), lr, now - start, checkpointed,
                            ce_loss=ce_acc / counted_acc if counted_acc else 0.0,
                            train_accuracy=correct_acc / counted_acc if counted_acc else float("nan"))
            t_log, imgs_since, loss_acc, loss_n = now, 0, 0.0, 0
            ce_acc, correct_acc, counted_acc = 0.0, 0, 0
    wall = time.perf_counter() - start
    card = {
        "name": run_dir.name,
        "dataset": dataset.name,
        "classes": dataset.classes,
        "image_size": net_config.image_size,
        "channels": net_config.in_channels,
        "normalization": "pixels in [0,1], network input 2x-1",
        "parameters": count_parameters(ema),
        "training": {
            **asdict(cfg),
            "split": dataset.split,
            "examples": n,
            "steps": step,
            "wall_seconds": round(wall, 1),
            "hardware": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
            "torch": torch.__version__,
        },
    }
    if init_from is not None:
        card["training"]["init_from"] = meta["init_from"]
    if card_extra:
        card.update(card_extra)
    save_checkpoint(run_dir / "model.safetensors", ema, card)


def export_from_state(run_dir: str | Path, out: str | Path, card_extra: dict[str, Any] | None = None) -> Path:
    """Write the EMA weights of an (unfinished) run's saved state as a checkpoint."""
    run_dir = Path(run_dir)
    state, tensors, _ = _read_state(run_dir)
    net = build_denoiser(NetConfig.from_dict(state["net"]))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    from .data import CIFAR10_CLASSES, MNIST_CLASSES

    classes = MNIST_CLASSES if state["dataset"] == "mnist" else CIFAR10_CLASSES
    card = {"name": Path(out).stem, "dataset": state["dataset"], "classes": classes,
            "image_size": net.config.image_size, "channels": net.config.in_channels,
            "training": {**state["train"], "steps": state["step"], "wall_seconds": state["wall_seconds"],
                         "unfinished_export": True}}
    if card_extra:
        card.update(card_extra)
    return save_checkpoint(out, net, card)

"""The ``rdc`` command line: train, classify, purify, attack, eval.

The parser is built from torch-free modules and every command imports the engine when
it runs, so ``rdc --help`` answers at once. Defenses are assembled by
:mod:`core.defense` and evaluations run by :func:`core.evaluate.run_evaluation`; this
module turns options into their arguments and engine errors into one-line messages.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .choices import (CLASSIFIER_MODES, DATASETS, DEFENSES, EVAL_ATTACKS, GRAD_MODES, NAMED_ATTACKS, NORMS,
                      GRIDS, OPTIMIZERS, PRESETS, SAMPLER_CHURN_RANGE, WEIGHTINGS)
from .runtime import OperationCancelled, cancellation_scope


class _LazyModule:
    """A module imported at its first attribute access (keeps ``rdc --help`` fast)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)


torch = _LazyModule("torch")

_ARGV: list[str] = []
GRAD_HELP = ("gradient mode of an attacked rdc: auto (smooth for sign-step purification, exact for Adam), "
             "exact (through the purification steps), smooth (exact, with a tanh surrogate in the backward "
             "pass of the sign steps) or bpda (identity through the purification)")
DATA_ROOT_HELP = ("dataset root (default: RDC_DATA_ROOT, else the user data folder, else shared/data beside a "
                  "source checkout; layouts: docs/data.md)")

def _command_line() -> str:
    """The command as the user typed it (for model cards and reports)."""
    return "rdc " + " ".join(shlex.quote(a) for a in _ARGV)


class _StopOnSignals:
    """Ctrl+C (SIGINT) and SIGTERM ask the running command to stop at its next check
    instead of killing it; a second Ctrl+C interrupts at once.

    Called, it is the check (``cancelled=stop``) that the engine polls between training
    steps and batches. ``with stop.scope():`` also makes the diffusion classifier poll it
    between its network calls (:func:`core.runtime.cancellation_scope`) and ends the block
    quietly when they stop, so a command ends within a second with its state saved and
    tells what it kept by reading ``stop()``. The handlers last until :func:`main` returns.
    """

    def __init__(self) -> None:
        self._requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True

    def __call__(self) -> bool:
        return self._requested

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Run the block with network calls that poll this stop; a stop ends the block."""
        with cancellation_scope(self):
            try:
                yield
            except OperationCancelled:
                if not self._requested:  # another scope's cancellation: not ours to swallow
                    raise


def _check_output_files(args: argparse.Namespace, *names: str, inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work is done, output options that name a folder, that cannot be
    written (a file where a folder must be, a folder without write permission), that name
    the same file as each other, or that name one of ``inputs`` (files the command reads)."""
    from .images import same_file

    given = [(f"--{name.replace('_', '-')}", getattr(args, name, None)) for name in names]
    given = [(option, value) for option, value in given if value]
    for option, value in given:
        if Path(value).is_dir() or str(value).endswith(("/", "\\")):
            raise SystemExit(f"rdc: error: {option} {value} is a folder; give a file name")
        _check_writable_folder(option, value, Path(value).parent)
        for path in inputs:
            if same_file(value, path):
                raise SystemExit(f"rdc: error: {option} {value} is an input of this command ({path}); "
                                 f"choose another file")
    for i, (option, value) in enumerate(given):
        for other, other_value in given[i + 1:]:
            if same_file(value, other_value):
                raise SystemExit(f"rdc: error: {option} and {other} name one file ({value}); give each its own")


def _check_writable_folder(option: str, value: str, folder: Path) -> None:
    """Refuse an output whose folder cannot be made or written: the nearest existing folder
    above it must be a folder (not a file) that this user may write in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SystemExit(f"rdc: error: {option} {value}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"rdc: error: {option} {value}: no permission to write in {existing}")


def _check_png_output(args: argparse.Namespace, *other_outputs: str) -> None:
    """The outputs of a command that reads ``args.image`` and writes the image it makes
    (``--out``: a PNG file) and ``other_outputs``: :func:`_check_output_files`, with the input
    image as the input."""
    _check_output_files(args, "out", *other_outputs, inputs=[args.image])
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise SystemExit(f"rdc: error: --out {args.out}: images are written as lossless PNG; name a .png file")


def _check_class_index(option: str, value: int | None, classes: list[str]) -> None:
    """Refuse a class index the model does not have."""
    if value is not None and not 0 <= value < len(classes):
        raise SystemExit(f"rdc: error: {option} {value} is not a class of this model (0..{len(classes) - 1})")


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _train_setup(args: argparse.Namespace):
    """``rdc train``'s network and training configs, data and starting model (``--init-from``).

    Raises ValueError or CheckpointError for settings that cannot train.
    """
    from .data import load_dataset
    from .nets import NetConfig
    from .train import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    init_net, init_name = None, None
    if args.grow_blocks and not args.init_from:
        raise ValueError("--grow-blocks deepens a trained checkpoint: give it with --init-from")
    if args.epochs == 0 and not args.init_from:
        raise ValueError("--epochs 0 trains nothing; it only copies (or, with --grow-blocks, deepens) an "
                         "--init-from checkpoint")
    if args.init_from:
        from .models import load_checkpoint

        init_model = load_checkpoint(args.init_from)
        if init_model.card.get("dataset") != args.dataset:
            raise ValueError(f"--init-from {args.init_from}: a {init_model.card.get('dataset')} model, not {args.dataset}")
        init_net, init_name = init_model.net, init_model.name
        if args.grow_blocks:
            from .nets import grow_denoiser

            init_net = grow_denoiser(init_net, args.grow_blocks, seed=args.seed)
            init_name = f"{init_model.name}, grown to {args.grow_blocks} blocks per level"
        net_cfg = NetConfig.from_dict(init_net.config.to_dict())
    ds = load_dataset(args.dataset, args.split, args.data_root)
    if args.limit:
        ds.images, ds.labels = ds.images[: args.limit], ds.labels[: args.limit]
    channels = 1 if args.dataset == "mnist" else 3
    size = 28 if args.dataset == "mnist" else 32
    if init_net is None:
        try:
            channel_list, head_list = _int_tuple(args.channels), _int_tuple(args.head_channels)
        except ValueError:
            raise ValueError("--channels and --head-channels are comma-separated whole numbers, e.g. 32,64,96") from None
        net_cfg = NetConfig(
            architecture=args.arch, image_size=size, in_channels=channels, num_classes=len(ds.classes),
            channels=channel_list, blocks_per_level=args.blocks, emb_dim=args.emb_dim,
            head_channels=head_list, dropout=args.dropout,
        )
    train_cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        bf16=args.bf16, seed=args.seed, checkpoint_minutes=args.checkpoint_minutes,
        threads=args.threads, max_minutes=args.max_minutes, ce_weight=args.ce_weight,
        ce_sigma_min=args.ce_sigma_min, ce_sigma_max=args.ce_sigma_max,
        lr_schedule=args.lr_schedule,
        **{k: v for k, v in (("p_mean", args.p_mean), ("p_std", args.p_std)) if v is not None},
    )
    return net_cfg, train_cfg, ds, init_net, init_name


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import default_data_root
    from .models import CheckpointError
    from .train import check_resume, train

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"rdc: error: --out {out} is a file; give a run directory (new, or one to resume)")
    _check_output_files(args, "log")
    _check_writable_folder("--out", args.out, out)
    device = resolve_device(args.device)  # before any work and before the run folder is made
    try:
        net_cfg, train_cfg, ds, init_net, init_name = _train_setup(args)
        changed = check_resume(out, net_cfg, train_cfg, ds)
    except (ValueError, CheckpointError) as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    if changed:
        print(f"rdc: note: resuming {out} with a changed schedule from its saved step ({'; '.join(changed)}); "
              f"the card records the new settings", file=sys.stderr)
    stop = _StopOnSignals()  # finish the step, save state, exit
    extra = {"training_command": _command_line(),
             "data": f"{args.dataset} {args.split} split (data root {args.data_root or default_data_root()})"}
    bar = rec = None
    for rec in train(ds, net_cfg, train_cfg, args.out, card_extra=extra, should_stop=stop,
                     device=device, log_every=args.log_every, init_from=init_net, init_name=init_name):
        if bar is None:
            # start counting at the first record: the steps before it (a resumed run's, or
            # the first log_every) took unknown time, and would show an absurd rate
            bar = tqdm(total=rec.total_steps, initial=rec.step, unit="step", dynamic_ncols=True,
                       mininterval=5, file=sys.stderr)
        bar.n = rec.step
        post = dict(loss=f"{rec.loss:.4f}", ips=f"{rec.images_per_second:.0f}", ep=f"{rec.epoch:.2f}")
        if rec.train_accuracy == rec.train_accuracy:  # not NaN: the hybrid objective is on
            post.update(ce=f"{rec.ce_loss:.3f}", acc=f"{rec.train_accuracy:.3f}")
        bar.set_postfix(post)
        bar.refresh()
        if args.log:
            Path(args.log).parent.mkdir(parents=True, exist_ok=True)  # as every other output does
            with open(args.log, "a") as f:
                record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)  # strict JSON
                          for k, v in rec.__dict__.items()}
                f.write(json.dumps(record, allow_nan=False) + "\n")
    if bar is not None:
        bar.close()
    if stop() and (rec is None or rec.step < rec.total_steps):  # a stop during the last step still finished
        print(f"stopped; state saved in {args.out} (re-run the same command to resume)", file=sys.stderr)
        return 130
    print(f"wrote {Path(args.out) / 'model.safetensors'}")
    return 0


def resolve_device(name: str, prog: str = "rdc") -> str:
    """The device for ``--device NAME`` (``auto``: CUDA when available, else CPU).

    An unavailable device is a usage error, as argparse reports one: a line on stderr
    starting with ``prog`` and exit status 2 (the repository's scripts pass their own
    ``parser.prog``).
    """
    from .defense import DeviceUnavailableError, resolve_device as resolve

    try:
        return resolve(name)
    except DeviceUnavailableError as exc:
        print(f"{prog}: error: --device {name}: {exc}; use --device cpu or auto", file=sys.stderr)
        raise SystemExit(2) from None


def parse_fraction(text: str, flag: str = "") -> float:
    """``0.3`` or ``8/255`` as a number (a one-line error naming ``flag`` otherwise)."""
    from .defense import parse_fraction as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {flag + ': ' if flag else ''}{exc}") from None


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number of at least ``minimum`` (and at most ``maximum``)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
        return value

    return parse


SEED = whole_number(-2**62, 2**62)
"""argparse type of every ``--seed``: torch generators take 64 bits, and seeds get an example's
index or a class index added."""


def finite_number(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
                  high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high] (``low_open``/``high_open``: excluding
    that end)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            left = "(" if low_open or low == -math.inf else "["
            right = ")" if high_open or high == math.inf else "]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {left}{low:g}, {high:g}{right}, "
                                             f"not {text}")
        return value

    return parse


def pixel_distance(positive: bool = False, at_most_one: bool = False) -> Callable[[str], float]:
    """argparse type: a distance in [0, 1] pixel units written as ``0.3`` or ``8/255``, at
    least 0 (above 0 when ``positive``; at most 1 when ``at_most_one``)."""
    from .choices import parse_fraction

    def parse(text: str) -> float:
        try:
            value = parse_fraction(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be {'above' if positive else 'at least'} 0, not {text}")
        if at_most_one and value > 1:
            raise argparse.ArgumentTypeError(f"must be at most 1 (the whole pixel range), not {text}; write grey "
                                             f"levels as a fraction, e.g. {text}/255")
        return value

    return parse


def _threshold(text: str) -> float:
    """``--binarize``'s threshold (:func:`core.defense.binarization_threshold`) as a usage error."""
    from .defense import binarization_threshold

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return binarization_threshold(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_binarize_arg(p: argparse.ArgumentParser) -> None:
    """``--binarize THRESHOLD`` of ``rdc classify``, ``attack`` and ``eval`` (never a default)."""
    p.add_argument("--binarize", type=_threshold, default=None, metavar="THRESHOLD",
                   help="the defense sees its input binarised: pixels above THRESHOLD (e.g. 0.5) become 1, the "
                        "rest 0 (the Binary-ABS trick for l-inf on MNIST); attacks get a straight-through gradient")


def _classifier_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"steps": args.dc_steps, "weighting": args.weighting, "sigma_min": args.sigma_min,
            "sigma_max": args.sigma_max, "mode": args.mode, "noise_seed": args.noise_seed,
            "screen_levels": args.screen_levels, "keep_classes": args.keep_classes, "grid": args.grid}


_CLASSIFIER_FLAGS = {"preset": "--preset", "dc_steps": "--levels", "weighting": "--weighting", "grid": "--grid",
                     "sigma_min": "--sigma-min", "sigma_max": "--sigma-max", "mode": "--mode",
                     "noise_seed": "--noise-seed", "screen_levels": "--screen-levels", "keep_classes": "--keep-classes"}
_PURIFY_FLAGS = {"eta": "--eta", "lm_steps": "--lm-steps", "lm_step_size": "--lm-step-size", "optimizer": "--optimizer"}


def _warn_ignored(args: argparse.Namespace, flags: dict[str, str], why: str) -> None:
    """Say on stderr which of ``flags`` (dest: option) were given although they do not apply."""
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) is not None]
    if given:
        verb = "does" if len(given) == 1 else "do"
        print(f"rdc: warning: {', '.join(given)} {verb} not apply {why}; ignored", file=sys.stderr)


def _warn_ignored_defense_options(args: argparse.Namespace) -> None:
    """``rdc attack`` / ``eval``: the options of the parts of the defense that ``--defense``
    leaves out (the CNN has no diffusion model; the DC alone no purification)."""
    if args.defense == "cnn":
        _warn_ignored(args, {"model": "--model", **_CLASSIFIER_FLAGS, **_PURIFY_FLAGS},
                      "to --defense cnn (the CNN is --cnn; no diffusion model is used)")
    elif args.defense == "dc":
        _warn_ignored(args, _PURIFY_FLAGS, "to --defense dc (no purification)")
    if args.defense != "rdc" and args.grad != "auto":
        print(f"rdc: warning: --grad {args.grad} does not apply to --defense {args.defense} (the gradient modes "
              f"are the RDC's, through its purification); ignored", file=sys.stderr)


def _add_classifier_args(p: argparse.ArgumentParser, steps_alias: bool = False) -> None:
    """The model, device, thread and classifier options (``steps_alias``: also accept the
    deprecated ``--steps`` for ``--levels``)."""
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="bundled model name or checkpoint path (default: the bundled default)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="named classifier and purification settings: paper (the RDC paper's Algorithm 1), "
                        "paper-code (the released code, its bugs fixed) or fast (paper with T = 16); they "
                        "replace the model card's defaults, and the other options override single values "
                        "(default: the one the model card names, else none)")
    p.add_argument("--levels", dest="dc_steps", type=whole_number(1), default=None, metavar="T",
                   help="classifier noise levels T (default: the model card's)")
    if steps_alias:
        p.add_argument("--steps", dest="dc_steps", type=whole_number(1), default=None, help=argparse.SUPPRESS)
    p.add_argument("--weighting", choices=WEIGHTINGS, default=None,
                   help="weights of the noise levels in the classifier's ELBO (default: the model card's)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="placement of the noise levels: quantile (equal-mass levels of the weighting), log "
                        "(equally spaced in ln sigma) or uniform (equally spaced in sigma) "
                        "(default: the model card's)")
    p.add_argument("--sigma-min", type=finite_number(0, low_open=True), default=None,
                   help="smallest classifier noise level (default: the model card's)")
    p.add_argument("--sigma-max", type=finite_number(0, low_open=True), default=None,
                   help="largest classifier noise level (default: the model card's)")
    p.add_argument("--mode", choices=CLASSIFIER_MODES, default=None,
                   help="deterministic: a frozen noise bank (same image, same logits); randomized: fresh noise "
                        "per call (default: the model card's)")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="seed of the classifier's noise bank (default: the model card's)")
    p.add_argument("--screen-levels", type=whole_number(0), default=None,
                   help="progressive class elimination: levels spent on all classes before the leading "
                        "--keep-classes get the rest (default: the model card's; 0 = off)")
    p.add_argument("--keep-classes", type=whole_number(0), default=None,
                   help="classes kept after the screening levels (default: the model card's; 0 = all)")
    p.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: OMP_NUM_THREADS if set, else one per usable core)")


def _add_purify_args(p: argparse.ArgumentParser, aliases: bool = False) -> None:
    """The likelihood-maximisation options (``aliases``: also the old spellings of ``rdc purify``)."""
    p.add_argument("--eta", type=pixel_distance(at_most_one=True), default=None,
                   help="purification l-inf radius in [0,1] units, e.g. 0.3 or 8/255 (default: the model card's)")
    p.add_argument("--lm-steps", type=whole_number(0), default=None, metavar="N",
                   help="purification (likelihood-maximisation) steps N (default: the model card's)")
    p.add_argument("--lm-step-size", type=pixel_distance(at_most_one=True), default=None,
                   help="purification step size in [0,1] units (default: the model card's)")
    if aliases:
        p.add_argument("--steps", dest="lm_steps", type=whole_number(0), default=None, help=argparse.SUPPRESS)
        p.add_argument("--step-size", dest="lm_step_size", type=pixel_distance(at_most_one=True), default=None,
                       help=argparse.SUPPRESS)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="purification optimiser: sign steps or Adam (default: the model card's)")


def _setup_threads(args: argparse.Namespace) -> None:
    from .defense import setup_threads

    setup_threads(args.threads)


def _load(args: argparse.Namespace):
    """The loaded model and its classifier (card defaults with the classifier options)."""
    from .classifier import UnconditionalModelError, build_classifier
    from .models import CheckpointError, load_checkpoint

    device = resolve_device(args.device)
    try:
        model = load_checkpoint(args.model, device=device)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    try:
        return model, build_classifier(model, device, preset=args.preset, **_classifier_overrides(args))
    except ValueError as exc:
        if isinstance(exc, UnconditionalModelError):
            raise
        raise SystemExit(f"rdc: error: classifier settings: {exc}") from None


def _load_cnn(name_or_path: str, device: str):
    """The CNN baseline and its card (:func:`core.baseline.load_cnn`); a bad file is a one-line error."""
    from .baseline import load_cnn
    from .models import CheckpointError

    try:
        return load_cnn(name_or_path, device=device)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None


def cmd_classify(args: argparse.Namespace) -> int:
    from .baseline import is_cnn_checkpoint
    from .images import ImageLoadError
    from .runtime import raise_if_cancelled

    _setup_threads(args)
    if is_cnn_checkpoint(args.model):  # the discriminative baseline, e.g. to judge samples
        device = resolve_device(args.device)
        _warn_ignored(args, _CLASSIFIER_FLAGS, "to the CNN baseline (no diffusion classifier)")
        classify, card = _load_cnn(args.model, device)
        name, classes, settings = card["name"], list(card["classes"]), None
        image_size, channels = card["image_size"], card["in_channels"]
        scorer = None  # no likelihood model: no out-of-distribution score
        calibratable = False
    else:
        model, classify = _load(args)
        device, name, classes = classify.device, model.name, model.classes
        settings = classify.settings.to_dict()
        image_size, channels = model.net.config.image_size, model.net.config.in_channels
        scorer = _ood_scorer(model)
        calibratable = bool(model.card.get("dataset"))  # rdc ood-calibrate needs the card's dataset
    if args.binarize is not None:  # the likelihood (OOD) score stays that of the image as given
        from .defense import InputBinarization

        classify = InputBinarization(classify, args.binarize)
        settings = (settings or {}) | {"binarize": args.binarize}
    results, status = [], 0

    def classify_image(path: str) -> None:
        nonlocal status
        try:
            x = _read_input_image(path, image_size, channels)[0].to(device)  # as rdc attack and purify read it
        except ImageLoadError as exc:
            print(f"rdc: error: {exc}", file=sys.stderr)
            results.append({"image": path, "error": str(exc)})
            status = 1
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = classify(x)[0]
        seconds = time.perf_counter() - t0
        probs = torch.softmax(logits, 0).cpu()
        pred = int(probs.argmax())
        ood = scorer.assess(x)[0] if scorer is not None else None
        results.append({"image": path, "predicted": pred, "class": classes[pred],
                        "confidence": float(probs[pred]), "probabilities": dict(zip(classes, map(float, probs))),
                        "logits": [float(v) for v in logits.cpu()], "seconds": seconds,
                        "ood": ood.to_dict() if ood is not None else None})
        if not args.json:
            bars = "  ".join(f"{c}:{p:.3f}" for c, p in zip(classes, probs.tolist()))
            print(f"{path}: {classes[pred]} ({float(probs[pred]):.1%})  [{bars}]  {seconds * 1000:.0f} ms")
            if ood is not None and ood.warning:
                print(f"{path}: warning: {ood.warning} [percentile {ood.percentile:.2f}]")

    stop = _StopOnSignals()
    with stop.scope():  # a slow model (EDM on a CPU) stops inside an image too
        for path in args.images:
            raise_if_cancelled(stop)
            classify_image(path)
    stopped = stop() and len(results) < len(args.images)  # a stop after the last image stops nothing
    if not args.json and scorer is not None and scorer.reference is None and not stopped and calibratable:
        print(f"note: no OOD reference for this model, so no out-of-distribution warnings (add one with "
              f"rdc ood-calibrate --model {args.model or name})")
    if args.json:  # what was classified, also when stopped ("stopped": true)
        print(json.dumps({"model": name, "settings": settings, "results": results, "stopped": stopped}, indent=2))
    if stopped:
        print(f"rdc: stopped after {len(results)} of {len(args.images)} images", file=sys.stderr)
        return 130
    return status


def _ood_scorer(model):
    """The out-of-distribution scorer of a loaded model (a malformed reference: one-line error)."""
    from .ood import OodScorer

    try:
        return OodScorer.for_model(model)
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {model.path}: {exc}; re-run rdc ood-calibrate") from None


MIN_OOD_REFERENCE = 1000  # the warning's quantiles are 0.1% and 99.9%: one image in a thousand each


def cmd_ood_calibrate(args: argparse.Namespace) -> int:
    """Score the first N validation images and store their quantiles in the model card."""
    from tqdm import tqdm

    from .data import load_dataset
    from .models import CheckpointError, load_checkpoint, update_card
    from .ood import CARD_KEY, OodScorer, OodSettings, make_reference, score_images
    from .runtime import run_to_end

    _setup_threads(args)
    device = resolve_device(args.device)
    try:
        model = load_checkpoint(args.model, device=device)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    if Path(model.path).suffix.lower() != ".safetensors":  # checked before hours of scoring, not after
        raise SystemExit(f"rdc: error: {model.path}: the reference is stored in a checkpoint's model card; convert "
                         f"the snapshot first (rdc import-edm {model.path} --out NAME.safetensors)")
    card_file = Path(model.path).with_suffix(".json")
    _check_writable_folder("--model", str(model.path), card_file.parent)
    if card_file.exists() and not os.access(card_file, os.W_OK):
        raise SystemExit(f"rdc: error: {card_file}: no permission to write the model card")
    dataset = model.card.get("dataset")
    if not dataset:
        raise SystemExit(f"rdc: error: {model.path}: the model card names no dataset to calibrate on")
    try:
        chosen = {"levels": args.levels, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max,
                  "noise_seed": args.noise_seed}
        settings = OodSettings(**{k: v for k, v in chosen.items() if v is not None})
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    ds = load_dataset(dataset, "val", args.data_root)
    n = min(args.n, len(ds)) if args.n else len(ds)
    if n < MIN_OOD_REFERENCE:
        print(f"rdc: warning: {n} images cannot pin down the 0.1% and 99.9% quantiles the out-of-distribution "
              f"warning is drawn at (it needs {MIN_OOD_REFERENCE} or more); the card's reference will be rough",
              file=sys.stderr)
    scorer = OodScorer(model.purifier_net, settings)
    stop = _StopOnSignals()
    t0 = time.perf_counter()
    scores = None
    # the scope stops a batch between its network calls (a costly network's batch is long)
    with stop.scope(), tqdm(total=n, unit="img", dynamic_ncols=True, file=sys.stderr) as bar:
        scores = run_to_end(score_images(scorer, ds.images[:n], args.batch_size, cancelled=stop, device=device),
                            lambda rec: bar.update(rec.done - bar.n))
    if scores is None:
        print(f"rdc: stopped; the model card of {model.path} was not changed", file=sys.stderr)
        return 130
    reference = make_reference(scores, settings, dataset, "val", command=_command_line(),
                               seconds=time.perf_counter() - t0)
    try:
        card = update_card(model.path, CARD_KEY, reference)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    q = dict(zip(reference["probabilities"], reference["quantiles"]))
    print(f"wrote {CARD_KEY} to {card}: {dataset} val, n={n}, bits/dim median {q[0.5]:.3f}, "
          f"0.1% {q[0.001]:.3f}, 99.9% {q[0.999]:.3f} ({reference['seconds']:.0f} s)")
    return 0


def _eval_config(args: argparse.Namespace):
    """The :class:`core.evaluate.EvalConfig` of ``rdc eval``'s options."""
    from .evaluate import EvalConfig, parse_indices

    try:
        indices = None if args.indices is None else parse_indices(args.indices)
    except ValueError as exc:
        raise SystemExit(f"rdc: error: --{exc}") from None
    return EvalConfig(dataset=args.dataset, split=args.split, n=args.n, indices=indices, data_root=args.data_root,
                      defense=args.defense, attack=args.attack, norm=args.norm, eps=parse_fraction(args.eps, "--eps"),
                      steps=args.steps, restarts=args.restarts, eot=args.eot, seed=args.seed,
                      targets=9 if args.targets is None else args.targets,
                      square_queries=args.square_queries, p_init=args.p_init, grad=args.grad, cnn=args.cnn,
                      binarize=args.binarize, batch_size=args.batch_size, state=args.state, command=_command_line())


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .evaluate import init_distributed, robust_log, run_evaluation
    from .models import atomic_write_bytes, atomic_write_json

    _check_output_files(args, "out", "log", "state")
    _warn_ignored_defense_options(args)
    if args.attack not in ("ensemble", "apgd-t") and args.targets is not None:
        print(f"rdc: warning: --targets applies to the ensemble and apgd-t, not {args.attack}; ignored",
              file=sys.stderr)
    _setup_threads(args)
    config = _eval_config(args)
    if config.state and config.attack == "none":
        print("rdc: warning: --state keeps attacked runs only; a clean evaluation runs whole", file=sys.stderr)
    if args.defense == "cnn":  # the diffusion model is not needed
        model, clf, purify = None, None, None
        device = resolve_device(args.device)
    else:
        model, clf = _load(args)
        device = str(clf.device)
        purify = _purify_settings(model, args) if args.defense == "rdc" else None
    rank, world = (0, 1) if config.attack == "none" else init_distributed(device)
    bar = None

    def progress(p) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, initial=p.done, unit="img", dynamic_ncols=True, file=sys.stderr,
                       disable=rank != 0)
        bar.update(p.done - bar.n)
        if p.robust_acc is None:
            bar.set_postfix(acc=f"{p.clean_acc:.4f}")
        elif p.done:
            bar.set_postfix(clean=f"{p.clean_acc:.3f}", robust=f"{p.robust_acc:.3f}")

    def warn(message: str) -> None:
        print(f"rdc: warning: {message} (choose it with --grad smooth or --grad bpda)", file=sys.stderr)

    stop = _StopOnSignals()
    report = None
    try:
        with stop.scope():  # a clean pass stops inside its batch too
            report = run_evaluation(config, model, clf, device=device, purify=purify, shard=(rank, world),
                                    progress=progress, warn=warn, cancelled=stop)
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    if report is None:
        if rank == 0:
            kept = (f"the examples finished are in {config.state}; re-run the same command to resume"
                    if config.state and config.attack != "none"
                    else "nothing was kept" if config.attack == "none"
                    else "nothing was kept (give --state FILE to make a run resumable)")
            print(f"rdc: stopped; {kept}", file=sys.stderr)
        return 130
    if rank != 0:
        return 0
    if args.log and report.attacked:
        atomic_write_bytes(args.log, robust_log(report).encode())
    if args.out:
        atomic_write_json(args.out, report.to_dict())
    lo, hi = report.ci95
    line = f"clean accuracy {report.clean_acc:.4f} on n={report.n} (95% CI {lo:.4f}-{hi:.4f})"
    if report.attacked:
        rlo, rhi = report.robust_ci95
        line += f", robust accuracy {report.robust_acc:.4f} (95% CI {rlo:.4f}-{rhi:.4f})"
    for row in report.per_attack or []:
        print(f"robust accuracy after {row.label}: {row.robust_acc:.4f} ({row.success} broken)")
    print(line + f", {report.seconds_per_image * 1000:.0f} ms/image")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import save_png_atomic
    from .models import CheckpointError, load_checkpoint
    from .images import same_file
    from .sample import is_sample_filename, sample, sample_filename

    if not args.out and not args.out_dir:
        raise SystemExit("rdc: error: give --out GRID.png, --out-dir DIR, or both")
    _check_output_files(args, "out")
    if args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise SystemExit(f"rdc: error: --out-dir {args.out_dir} is a file; give a folder")
    if args.out_dir:
        _check_writable_folder("--out-dir", args.out_dir, Path(args.out_dir))
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise SystemExit("rdc: error: --out must be a .png file")
    if (args.out and args.out_dir and same_file(Path(args.out).parent, args.out_dir)
            and is_sample_filename(Path(args.out).name)):
        raise SystemExit(f"rdc: error: --out {args.out} is named like one of the samples --out-dir writes "
                         f"(LABEL-INDEX.png); give the grid another name")
    _setup_threads(args)
    try:
        model = load_checkpoint(args.model, device=resolve_device(args.device))
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    k = model.net.config.num_classes
    if args.label == "all":
        labels: list[int | None] = list(range(k)) if k else [None]  # a model without classes samples unconditionally
    elif args.label == "uncond":
        labels = [None]
    else:
        try:
            labels = [int(args.label)]
        except ValueError:
            raise SystemExit(f"rdc: error: --label must be a class index, 'all' or 'uncond', not {args.label!r}") from None
        _check_class_index("--label", labels[0], model.classes)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    columns = []
    stop = _StopOnSignals()
    for done, y in enumerate(labels):
        last = None
        for last in sample(model.net, y, n=args.n, steps=args.sampler_steps, seed=args.seed + (y or 0),
                           cancelled=stop, churn=args.churn):
            pass
        if stop() or last is None or last.step < last.total_steps:
            kept = f"; {done * args.n} PNGs of the classes before it are in {out_dir}" if out_dir and done else ""
            print(f"rdc: stopped{kept}; no grid written", file=sys.stderr)
            return 130
        if out_dir is not None:
            for i, image in enumerate(last.image):
                save_png_atomic(image, out_dir / sample_filename(y, i))
        columns.append(np.concatenate(list(last.image), axis=1))  # stack the n samples vertically
    if args.out:
        save_png_atomic(np.concatenate(columns, axis=2), Path(args.out))
        churned = f", churn {args.churn:g}" if args.churn else ""
        print(f"wrote {args.out} ({len(labels)} column(s) x {args.n} sample(s), {args.sampler_steps} Heun steps"
              f"{churned})")
    if out_dir is not None:
        print(f"wrote {len(labels) * args.n} PNGs to {out_dir} (LABEL-INDEX.png)")
        written = {sample_filename(y, i) for y in labels for i in range(args.n)}
        older = sorted(p.name for p in out_dir.glob("*.png")
                       if p.name not in written and is_sample_filename(p.name))
        if older:  # the gallery shows every sample in the folder: say so rather than delete the user's files
            print(f"rdc: warning: {out_dir} also holds {len(older)} sample(s) of an earlier run "
                  f"({', '.join(older[:3])}{', ...' if len(older) > 3 else ''}); the app's gallery shows them "
                  f"too: remove them or use an empty folder", file=sys.stderr)
    return 0


def cmd_train_cnn(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .baseline import save_cnn, train_cnn
    from .data import load_dataset
    from .evaluate import hardware_description, wilson_interval
    from .runtime import run_to_end

    _check_output_files(args, "out")
    if Path(args.out).suffix not in ("", ".safetensors"):
        raise SystemExit(f"rdc: error: --out {args.out}: the CNN is saved as NAME.safetensors (with NAME.json)")
    _setup_threads(args)
    ds = load_dataset(args.dataset, "train", args.data_root)
    t0 = time.perf_counter()
    with tqdm(unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        def show(rec) -> None:
            bar.total = rec.total_steps
            bar.n = rec.step
            bar.set_postfix(loss=f"{rec.loss:.4f}", acc=f"{rec.accuracy:.4f}")
            bar.refresh()

        model = run_to_end(train_cnn(ds, epochs=args.epochs, seed=args.seed, cancelled=_StopOnSignals()), show)
    if model is None:
        print("rdc: stopped; nothing written (the CNN trains in about 10 minutes on one CPU core, with no resume: re-run it whole)", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    metrics = {}
    for split in ("val", "test"):
        ev = load_dataset(args.dataset, split, args.data_root)
        with torch.no_grad():
            pred = torch.cat([model(ev.float_images(slice(i, i + 500))).argmax(1) for i in range(0, len(ev), 500)])
        k = int((pred == ev.labels).sum())
        metrics[split] = {"n": len(ev), "accuracy": k / len(ev), "ci95": list(wilson_interval(k, len(ev)))}
    card = {"name": Path(args.out).stem, "dataset": args.dataset, "classes": ds.classes,
            "training_command": _command_line(), "training": {"epochs": args.epochs, "seed": args.seed,
            "wall_seconds": round(wall, 1), "hardware": hardware_description(), "split": "train"},
            "metrics": metrics}
    path = save_cnn(args.out, model, card)
    print(f"wrote {path}: val {metrics['val']['accuracy']:.4f}, test {metrics['test']['accuracy']:.4f}")
    return 0


def _purify_settings(model, args: argparse.Namespace):
    """The model card's purification settings with the purification options applied."""
    from .defense import purify_settings

    eta, size = getattr(args, "eta", None), getattr(args, "lm_step_size", None)
    try:
        return purify_settings(model, preset=getattr(args, "preset", None),
                               eta=None if eta is None else parse_fraction(eta, "--eta"),
                               step_size=None if size is None else parse_fraction(size, "--lm-step-size"),
                               steps=getattr(args, "lm_steps", None), optimizer=getattr(args, "optimizer", None))
    except ValueError as exc:
        raise SystemExit(f"rdc: error: purification settings: {exc}") from None


def _read_input_image(path: str, image_size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """The image a command works on (a batch of one, on the 8-bit grid, as a PNG holds it and
    the attacks work) and what converting the file changed
    (:func:`core.images.conversion_changes`; empty when it is the file's pixels).

    Raises
    ------
    ImageLoadError
        Naming the file, when it cannot be read or converted.
    """
    from .images import ImageLoadError, conversion_changes, convert_image, load_image

    img = load_image(path)
    try:
        arr = convert_image(img, image_size, channels)
    except ImageLoadError as exc:
        raise ImageLoadError(exc if str(path) in str(exc) else f"{path}: {exc}") from None
    x = torch.round(torch.from_numpy(arr).unsqueeze(0) * 255) / 255
    return x, conversion_changes(img, arr)


def _load_input_image(path: str, image_size: int, channels: int) -> tuple[torch.Tensor, list[str]]:
    """:func:`_read_input_image`, a file that cannot be read being a one-line error."""
    from .images import ImageLoadError

    try:
        return _read_input_image(path, image_size, channels)
    except ImageLoadError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None


def cmd_purify(args: argparse.Namespace) -> int:
    from .defense import build_maximizer
    from .images import save_png_atomic
    from .runtime import time_left_text

    _check_png_output(args)
    _setup_threads(args)
    model, clf = _load(args)
    x = _load_input_image(args.image, model.net.config.image_size, model.net.config.in_channels)[0].to(clf.device)
    lm = build_maximizer(model, _purify_settings(model, args))
    stop = _StopOnSignals()
    steps = []

    def show(r) -> None:  # text output: each step as it is made
        step = {"step": r.step, "objective": float(r.objective[0]), "objective_estimate": float(r.objective_estimate[0]),
                "sigma": r.sigma, "linf": float(r.linf[0]), "l2": float(r.l2[0]),
                "probabilities": torch.softmax(torch.from_numpy(r.logits[0]), 0).tolist()}
        steps.append(step)
        if not args.json:
            p = step["probabilities"]
            top = max(range(len(p)), key=p.__getitem__)
            left = time_left_text(time.perf_counter() - t0, r.step, lm.settings.steps)
            print(f"step {step['step']:3d}  objective {step['objective_estimate']:10.3f} (this step's draw "
                  f"{step['objective']:10.3f})  linf {step['linf']:.4f}  "
                  f"l2 {step['l2']:.3f}  -> {model.classes[top]} ({p[top]:.1%})" + (f"  {left}" if left else ""))

    t0 = time.perf_counter()
    final = None
    with stop.scope():  # stops inside a step's network passes too
        for final in lm.run(x, classifier=clf, cancelled=stop):
            show(final)
    seconds = time.perf_counter() - t0
    if stop() and len(steps) <= lm.settings.steps:  # not every step ran
        done = max(0, len(steps) - 1)  # step 0 is the input itself
        print(f"rdc: stopped after {done} of {lm.settings.steps} steps; nothing written", file=sys.stderr)
        return 130
    image = final.image[0] if final is not None else x[0].cpu().numpy()
    if args.out:
        save_png_atomic(image, args.out, source=args.image)
    if args.json:
        print(json.dumps({"image": args.image, "out": args.out, "settings": lm.settings.to_dict(),
                          "classifier": clf.settings.to_dict(), "steps": steps, "seconds": seconds,
                          "classes": model.classes}, indent=2))
    else:
        print(f"{seconds:.2f} s" + (f", wrote {args.out}" if args.out else ""))
    return 0


MAX_REPORT_BYTES = 2**30  # per-example records of a large evaluation stay far below this


def cmd_worst_case(args: argparse.Namespace) -> int:
    from .evaluate import run_label, worst_case_log, worst_case_report
    from .models import atomic_write_json, read_json_object

    _check_output_files(args, "out", inputs=[*args.reports, *args.follow_up])

    def read(path: str) -> dict:
        try:
            report = read_json_object(path, "attack report", max_bytes=MAX_REPORT_BYTES)
        except ValueError as exc:
            raise SystemExit(f"rdc: error: {exc}") from None
        if "per_example" not in report or "settings" not in report:
            raise SystemExit(f"rdc: error: {path} is not an rdc eval attack report")
        return report

    if len({Path(p).resolve() for p in args.reports}) < len(args.reports):
        raise SystemExit("rdc: error: a report is given twice; the worst case needs the reports of different runs")
    reports = [read(path) for path in args.reports]
    follow_ups = [read(path) for path in args.follow_up]
    try:
        report = worst_case_report(
            reports, labels=[f"{Path(p).name} ({run_label(r)})" for p, r in zip(args.reports, reports)],
            follow_ups=follow_ups,
            follow_up_labels=[f"{Path(p).name} ({run_label(r)}, follow-up)" for p, r in zip(args.follow_up, follow_ups)])
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    report["reports"] = [str(p) for p in args.reports]
    if follow_ups:
        report["follow_ups"] = [str(p) for p in args.follow_up]
    largest = max(r["n"] for r in reports)
    for path, r in zip(args.reports, reports):
        if r["settings"].get("indices") and report["n"] < largest:  # typically a follow-up given as a report
            print(f"rdc: warning: {path} attacked chosen examples (--indices), which narrowed the worst case to "
                  f"{report['n']} of {largest} examples; if it attacked an earlier run's survivors, give it with "
                  f"--follow-up", file=sys.stderr)
    print(worst_case_log(report), end="")
    if args.out:
        atomic_write_json(args.out, report)
    return 0


def _build_defense(kind: str, model, clf, args: argparse.Namespace):
    """:func:`core.defense.build_defense` for the options of ``rdc attack``; warns (with the
    option to change) when the gradient mode masks gradients."""
    from .defense import build_defense, gradient_warning
    from .models import CheckpointError

    try:
        defense = build_defense(kind, model, clf, purify=_purify_settings(model, args) if kind == "rdc" else None,
                                grad_mode=args.grad, cnn=args.cnn, device=str(clf.device), binarize=args.binarize)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    warning = gradient_warning(defense)
    if warning and args.attack not in ("square", "transfer"):
        print(f"rdc: warning: {warning} (choose it with --grad smooth or --grad bpda)", file=sys.stderr)
    return defense


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (10^6 bytes); None where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def cmd_attack(args: argparse.Namespace) -> int:
    from .attacks import AttackSettings, attack, run_to_end
    from .defense import attack_threshold
    from .images import save_png_atomic
    from .models import atomic_write_json
    from .runtime import time_left_text

    _check_png_output(args, "report")
    method, loss = NAMED_ATTACKS[args.attack]
    if args.target is not None and loss != "dlr-targeted":
        raise SystemExit(f"rdc: error: --target applies to the targeted attack (apgd-t), not {args.attack}")
    if args.target is not None and args.label is not None and args.target == args.label:
        raise SystemExit("rdc: error: --target is the true class (--label): a targeted attack needs another class")
    _warn_ignored_defense_options(args)
    if args.step_size is not None and method != "pgd":
        print(f"rdc: warning: --step-size is PGD's; {args.attack} sets its own steps; ignored", file=sys.stderr)
    _setup_threads(args)
    if args.defense == "cnn":  # the baseline alone: the diffusion model is not loaded
        defense, card = _load_cnn(args.cnn, resolve_device(args.device))
        if args.binarize is not None:
            from .defense import InputBinarization

            defense = InputBinarization(defense, args.binarize)
        classes, image_size, channels = list(card["classes"]), card["image_size"], card["in_channels"]
        model_name, classifier_settings = card.get("name", args.cnn), None
        device = next(defense.parameters()).device
    else:
        model, clf = _load(args)
        classes, image_size, channels = model.classes, model.net.config.image_size, model.net.config.in_channels
        model_name, classifier_settings, device = model.name, clf.settings.to_dict(), clf.device
        defense = _build_defense(args.defense, model, clf, args)
    _check_class_index("--label", args.label, classes)
    _check_class_index("--target", args.target, classes)
    x, changes = _load_input_image(args.image, image_size, channels)
    x = x.to(device)
    if changes:
        print(f"rdc: warning: {args.image} was converted for the model ({'; '.join(changes)}): the adversarial "
              f"image and its distances are those of the converted image, not of the file", file=sys.stderr)
    grad = getattr(defense, "grad_mode", None)  # reports record the mode actually used (auto resolved)
    with torch.no_grad():
        clean_logits = defense(x)
    label = int(clean_logits.argmax(1)) if args.label is None else args.label
    try:
        settings = AttackSettings(method=method, loss=loss, norm=args.norm, eps=parse_fraction(args.eps, "--eps"),
                                  steps=args.steps, restarts=args.restarts, eot=args.eot, seed=args.seed,
                                  step_size=parse_fraction(args.step_size, "--step-size") if args.step_size else None,
                                  target=args.target, p_init=args.p_init,
                                  **attack_threshold(method, args.binarize))
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    y = torch.tensor([label], device=x.device)

    iterations_run = 0  # an attack may stop early (every example fooled, or a local minimum)

    def show(rec) -> None:
        nonlocal iterations_run
        iterations_run += 1
        if not args.quiet and (rec.iteration % max(1, args.steps // 10) == 0 or rec.iteration == args.steps):
            left = time_left_text(time.perf_counter() - t0, iterations_run, settings.steps * settings.restarts)
            print(f"iter {rec.iteration:4d}/{rec.total_iterations}  loss {rec.loss[0]:9.4f}  margin "
                  f"{rec.margin[0]:9.4f}  pred {classes[int(rec.prediction[0])]}  "
                  f"linf {rec.linf[0]:.4f}  l2 {rec.l2[0]:.3f}" + (f"  {left}" if left else ""), file=sys.stderr)

    t0 = time.perf_counter()
    result = run_to_end(attack(defense, x, y, settings, _StopOnSignals()), show)
    seconds = time.perf_counter() - t0
    if result is None:
        print(f"rdc: stopped after {iterations_run} iterations; nothing written", file=sys.stderr)
        return 130
    with torch.no_grad():
        adv_logits = defense(result.adversarial)
    adv_pred = int(adv_logits.argmax(1))
    if args.out:
        save_png_atomic(result.adversarial[0].cpu().numpy(), args.out, source=args.image)
    peak_mb = _peak_rss_mb()
    report = {
        "image": args.image, "input_conversion": changes, "out": args.out, "model": model_name, "defense": args.defense, "attack": args.attack,
        "grad": grad if args.defense == "rdc" else None, "binarize": args.binarize, "settings": settings.to_dict(),
        "classifier": classifier_settings,
        "purify": _purify_settings(model, args).to_dict() if args.defense == "rdc" else None,
        "label": label, "label_name": classes[label],
        "clean_probabilities": torch.softmax(clean_logits[0], 0).tolist(),
        "adversarial_prediction": adv_pred, "adversarial_class": classes[adv_pred],
        "adversarial_probabilities": torch.softmax(adv_logits[0], 0).tolist(),
        "success": bool(result.success[0]), "linf": float(result.linf[0]), "l2": float(result.l2[0]),
        "checks": result.checks, "queries": result.queries, "seconds": seconds,
        "iterations": iterations_run, "seconds_per_iteration": seconds / max(1, iterations_run),
        "peak_rss_mb": peak_mb,
        "command": _command_line(),
    }
    if args.report:
        atomic_write_json(args.report, report)
    verdict = "attack succeeded" if report["success"] else "attack failed"
    print(f"{verdict}: {classes[label]} -> {classes[adv_pred]}  linf {report['linf']:.4f} "
          f"l2 {report['l2']:.3f}  {seconds:.1f} s ({iterations_run} iterations, "
          f"{report['seconds_per_iteration']:.2f} s/iter)"
          + (f", peak RSS {peak_mb:.0f} MB" if peak_mb is not None else ""))
    return 0


def cmd_import_edm(args: argparse.Namespace) -> int:
    """Convert an EDM snapshot (.pkl) into a checkpoint, reading it with the safe importer."""
    from .edm_import import import_edm
    from .models import CheckpointError

    try:
        path = import_edm(args.snapshot, args.out, command=_command_line(), purifier=args.purifier,
                          preset=args.preset)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    card = json.loads(path.with_suffix(".json").read_text())
    pair = f", purifier {card['purifier']['path']}" if card.get("purifier") else ""
    print(f"wrote {path} and {path.with_suffix('.json').name}: {card['description']}, "
          f"{card['parameters']:,} parameters, {len(card['classes'])} classes{pair}; use it with --model {path}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default, unless the help text already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (text != argparse.SUPPRESS and "default" not in text and action.option_strings
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    """The threat model and budget options shared by ``rdc attack`` and ``rdc eval``."""
    p.add_argument("--norm", choices=NORMS, default="linf", help="threat model: l-inf or l2 ball")
    p.add_argument("--eps", type=pixel_distance(), default="0.3", help="attack radius in [0,1] units, e.g. 0.3 or 8/255")
    p.add_argument("--steps", type=whole_number(1), default=100,
                   help="attack iterations (APGD, PGD; Square: queries, unless rdc eval's --square-queries)")
    p.add_argument("--restarts", type=whole_number(1), default=1, help="attack restarts (random starts)")
    p.add_argument("--eot", type=whole_number(1), default=1,
                   help="expectation over transformation: gradient (Square: query) draws averaged per step")
    p.add_argument("--seed", type=SEED, default=0, help="attack seed (random starts, Square's squares)")
    p.add_argument("--p-init", type=finite_number(0, 1, low_open=True), default=0.8, help="Square: initial fraction of pixels per square")
    p.add_argument("--grad", choices=GRAD_MODES, default="auto", help=GRAD_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdc", description="Robust Diffusion Classifier engine",
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a diffusion classifier (resumable)")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="training data")
    p.add_argument("--data-root", default=None,
                   help=DATA_ROOT_HELP)
    p.add_argument("--split", default="train", choices=["train", "train-full"],
                   help="train: the training split without the validation images; train-full: all of it")
    p.add_argument("--out", required=True, help="run directory (resumes if it holds a state)")
    p.add_argument("--arch", choices=["multihead", "embedding"], default="multihead",
                   help="multihead: one shared trunk with a branch per class; embedding: a class-embedding UNet")
    p.add_argument("--channels", default="32,64,128", help="UNet channels per resolution, comma-separated")
    p.add_argument("--head-channels", default="16,8", help="multi-head: per-class branch widths (coarse to fine)")
    p.add_argument("--blocks", type=whole_number(1), default=1, help="residual blocks per resolution")
    p.add_argument("--emb-dim", type=whole_number(2), default=128,
                   help="width of the noise-level (and class) embedding (an even number)")
    p.add_argument("--dropout", type=finite_number(0, 1, high_open=True), default=0.0, help="dropout rate in the residual blocks")
    p.add_argument("--epochs", type=finite_number(0), default=10.0, help="passes over the training data (may be fractional)")
    p.add_argument("--batch-size", type=whole_number(1), default=128, help="training batch size")
    p.add_argument("--lr", type=finite_number(0, low_open=True), default=1e-3, help="peak learning rate (Adam)")
    p.add_argument("--ema-decay", type=finite_number(0, 1, high_open=True), default=0.999, help="decay of the weights' exponential moving average")
    p.add_argument("--warmup-steps", type=whole_number(0), default=500, help="linear learning-rate warm-up")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant, or half a cosine down to 0 at the last step")
    p.add_argument("--p-mean", type=finite_number(), default=None,
                   help="training noise levels: mean of ln sigma (default: EDM's -1.2; larger trains "
                        "the classifier's mid and high levels more)")
    p.add_argument("--p-std", type=finite_number(0, low_open=True), default=None,
                   help="training noise levels: std of ln sigma (default: EDM's 1.2)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="bfloat16 autocast (fast on GPUs and CPUs with AMX/AVX512-BF16, slow elsewhere)")
    precision.add_argument("--fp32", action="store_true", help="float32 throughout (the default)")
    p.add_argument("--ce-weight", type=finite_number(0), default=0.0,
                   help="hybrid objective: weight of the cross-entropy of the classifier's own logits "
                        "(multi-head; 0 = purely generative)")
    p.add_argument("--ce-sigma-min", type=finite_number(0, low_open=True), default=0.1,
                   help="hybrid objective: smallest noise level whose draws enter the cross-entropy term")
    p.add_argument("--ce-sigma-max", type=finite_number(0, low_open=True), default=10.0,
                   help="hybrid objective: largest noise level whose draws enter the cross-entropy term")
    p.add_argument("--init-from", default=None, metavar="NAME|PATH",
                   help="fine-tune: start from this checkpoint's weights (its architecture replaces "
                        "--arch/--channels/--head-channels/--blocks/--emb-dim)")
    p.add_argument("--grow-blocks", type=whole_number(0), default=0, metavar="N",
                   help="with --init-from: deepen the checkpoint to N residual blocks per resolution, "
                        "the added blocks starting as the identity (the grown network computes the same "
                        "function before training)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initialisation, data order, noise draws and dropout")
    p.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (CUDA when available)")
    p.add_argument("--max-minutes", type=finite_number(0), default=0.0,
                   help="stop after this wall time and write the model (0: no limit)")
    p.add_argument("--checkpoint-minutes", type=finite_number(0, low_open=True), default=5.0, help="minutes between resumable state saves")
    p.add_argument("--log-every", type=whole_number(1), default=50, help="steps between progress records")
    p.add_argument("--log", default=None, help="append JSON lines of step records here")
    p.add_argument("--limit", type=whole_number(0), default=0, help="train on the first N examples only (smoke runs; 0: all)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-cnn", help="train the small discriminative CNN baseline")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="training data")
    p.add_argument("--data-root", default=None,
                   help=DATA_ROOT_HELP)
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors; a .json card is written beside)")
    p.add_argument("--epochs", type=finite_number(0, low_open=True), default=3.0, help="passes over the training data")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the initialisation and data order")
    p.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: OMP_NUM_THREADS if set, else one per usable core)")
    p.set_defaults(func=cmd_train_cnn)

    p = sub.add_parser("classify", help="classify image files with the diffusion classifier (or the CNN baseline: --model mnist-cnn)")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    _add_classifier_args(p, steps_alias=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_binarize_arg(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("sample", help="generate images of a class with the EDM sampler (a PNG grid, or one PNG per sample)")
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="bundled model name or checkpoint path (default: the bundled default)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--label", default="all", help="class index, 'all' (one column per class) or 'uncond'")
    p.add_argument("--n", type=whole_number(1), default=4, help="samples per class")
    p.add_argument("--sampler-steps", type=whole_number(1), default=18, help="Heun steps of the EDM sampler")
    p.add_argument("--churn", type=finite_number(0), default=0.0,
                   help="EDM's S_churn: add fresh noise at each step with sigma in [%g, %g] "
                        "(stochastic sampling; 0, the default: deterministic)" % SAMPLER_CHURN_RANGE)
    p.add_argument("--seed", type=SEED, default=0, help="sampling seed (plus the class index)")
    p.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: OMP_NUM_THREADS if set, else one per usable core)")
    p.add_argument("--out", default=None, help="write all samples as one PNG grid (a column per class)")
    p.add_argument("--out-dir", default=None,
                   help="write one PNG per sample into this folder, named LABEL-INDEX.png (e.g. 3-007.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("purify", help="likelihood maximisation of one image (the RDC's purification)")
    p.add_argument("image", help="image file to purify (never overwritten)")
    _add_purify_args(p, aliases=True)
    p.add_argument("--out", default=None, help="write the purified image here (PNG)")
    p.add_argument("--json", action="store_true", help="print every step as JSON")
    _add_classifier_args(p)
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("attack", help="craft an adversarial example against a defense")
    p.add_argument("image", help="image file to attack (as stored: 8-bit)")
    p.add_argument("--defense", choices=DEFENSES, default="rdc",
                   help="rdc: purification + diffusion classifier; dc: the classifier alone; cnn: the baseline")
    p.add_argument("--attack", choices=sorted(NAMED_ATTACKS), default="apgd-ce",
                   help="apgd-ce, apgd-dlr, apgd-t (targeted DLR), pgd (cross-entropy), square (gradient-free) or "
                        "flip (the threshold-flip attack on a binarising defense: needs --binarize)")
    _add_attack_args(p)
    p.add_argument("--step-size", type=pixel_distance(positive=True), default=None, help="PGD step size in [0,1] units (default: 2.5 eps / steps; "
                                                     "APGD adapts its own)")
    p.add_argument("--label", type=int, default=None, help="true class (default: the clean prediction)")
    p.add_argument("--target", type=int, default=None, help="apgd-t target class (default: runner-up)")
    p.add_argument("--cnn", default="mnist-cnn", help="CNN checkpoint for --defense cnn")
    _add_binarize_arg(p)
    _add_purify_args(p)
    p.add_argument("--out", default=None, help="adversarial PNG (8-bit, lossless)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--quiet", action="store_true", help="no per-iteration progress lines")
    _add_classifier_args(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("eval", help="evaluate accuracy on a dataset split (clean, or under attack)")
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="evaluation data")
    p.add_argument("--data-root", default=None,
                   help=DATA_ROOT_HELP)
    p.add_argument("--split", choices=["test", "val", "train"], default="test", help="dataset split")
    picked = p.add_mutually_exclusive_group()
    picked.add_argument("--n", "--num-examples", dest="n", type=whole_number(0), default=None,
                        help="first N examples (default or 0: all); spell it --num-examples under torchrun")
    picked.add_argument("--indices", default=None, metavar="LIST",
                        help="these examples instead of the first N, e.g. 1,13,28-35 (the survivors of an earlier "
                             "run, attacked again with a larger budget: each example's attack is seeded by its "
                             "index alone)")
    p.add_argument("--defense", choices=DEFENSES, default="dc",
                   help="dc: diffusion classifier; rdc: likelihood maximisation + dc; cnn: the baseline")
    p.add_argument("--attack", choices=EVAL_ATTACKS, default="none",
                   help="none: clean accuracy; ensemble: APGD-CE, APGD-DLR, targeted APGD-DLR, Square and a "
                        "transfer attack from --cnn, each on the examples still unbroken (AutoAttack style); "
                        "transfer: the ensemble's transfer attack alone (APGD-CE crafted on --cnn); or one attack")
    _add_attack_args(p)
    p.add_argument("--targets", type=whole_number(1), default=None,
                   help="ensemble and apgd-t: target classes of targeted APGD-DLR (the top runner-up "
                        "classes; default 9)")
    p.add_argument("--square-queries", type=whole_number(1), default=None,
                   help="Square iterations (default: 5000 in the ensemble, --steps for --attack square)")
    p.add_argument("--cnn", default="mnist-cnn",
                   help="CNN checkpoint: --defense cnn, and the ensemble's transfer source")
    _add_binarize_arg(p)
    _add_purify_args(p)
    p.add_argument("--batch-size", type=whole_number(1), default=50, help="examples per batch (results do not depend on it)")
    p.add_argument("--state", default=None, help="per-example results file: an interrupted run resumes from it")
    p.add_argument("--out", default=None, help="write the JSON report here (atomically)")
    p.add_argument("--log", "--log-file", dest="log", default=None,
                   help="attack evaluations: write a readable AutoAttack-style log here (atomically, at the end); "
                        "spell it --log-file under torchrun")
    _add_classifier_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ood-calibrate", help="store the out-of-distribution reference (bits/dim quantiles on "
                                             "the validation split) in a model's card")
    p.add_argument("--model", default=None, metavar="NAME|PATH",
                   help="bundled model name or checkpoint path whose JSON card is updated (default: the "
                        "bundled default)")
    p.add_argument("--n", type=whole_number(0), default=1000, help="validation images scored (0: the whole split)")
    p.add_argument("--data-root", default=None,
                   help=DATA_ROOT_HELP)
    p.add_argument("--levels", type=whole_number(1), default=None, metavar="L",
                   help="noise levels of the score's quadrature, evenly spaced in log sigma (default: 16)")
    p.add_argument("--sigma-min", type=finite_number(0, low_open=True), default=None, help="smallest noise level of the score (default: 0.002)")
    p.add_argument("--sigma-max", type=finite_number(0, low_open=True), default=None, help="largest noise level of the score (default: 80)")
    p.add_argument("--noise-seed", type=int, default=None, help="seed of the score's frozen noise bank (default: 0)")
    p.add_argument("--batch-size", type=whole_number(1), default=50, help="images per network pass (times L levels)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.add_argument("--threads", type=whole_number(0), default=0, help="torch CPU threads (0: OMP_NUM_THREADS if set, else one per usable core)")
    p.set_defaults(func=cmd_ood_calibrate)

    p = sub.add_parser("worst-case", help="per-example worst case over several rdc eval reports of one model",
                       description="An example counts as robust only if every report left it robust (e.g. the "
                                   "exact, smooth and BPDA evaluations of the RDC). Taken over the examples all "
                                   "reports share.")
    p.add_argument("reports", nargs="+", help="rdc eval --out JSON reports (two or more, or one with --follow-up)")
    p.add_argument("--follow-up", nargs="+", default=[], metavar="REPORT",
                   help="reports of runs on some of the examples (e.g. rdc eval --indices on the survivors, with a "
                        "larger budget): they count where they attacked and do not narrow the examples")
    p.add_argument("--out", default=None, help="write the combined JSON report here (atomically)")
    p.set_defaults(func=cmd_worst_case)

    p = sub.add_parser("import-edm", help="convert an EDM snapshot (.pkl) into a checkpoint, without running "
                                          "the code inside the pickle")
    p.add_argument("snapshot", help="EDM snapshot, e.g. cifar10-32x32-cond-vp.pkl or network-snapshot-*.pkl")
    p.add_argument("--out", required=True, metavar="NAME_OR_DIR",
                   help="output checkpoint path (.safetensors added; a .json card beside it), or a folder "
                        "(existing, or ending in /) to write SNAPSHOT-STEM.safetensors into")
    p.add_argument("--purifier", default=None, metavar="UNCOND.pkl|CHECKPOINT",
                   help="the model whose unconditional denoiser purifies, as in the RDC paper (EDM's "
                        "cifar10-32x32-uncond-vp.pkl): a snapshot is converted beside the output, a checkpoint "
                        "is referenced where it is; the card names it, so the pair is one --model")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="record a preset (paper, paper-code, fast) as the card's default settings")
    p.set_defaults(func=cmd_import_edm)
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    args = parser.parse_args(argv)
    from .data import DatasetNotFoundError
    from .classifier import UnconditionalModelError
    from .defense import DeviceUnavailableError
    from .attacks.base import NonFiniteGradientError

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (outputs are written atomically or not at all)
        print("rdc: interrupted", file=sys.stderr)
        return 130
    except (DatasetNotFoundError, DeviceUnavailableError, UnconditionalModelError) as exc:  # engine errors that are the user's to fix
        print(f"rdc: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteGradientError as exc:  # the attacked defense, not the command line
        print(f"rdc: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a disk that fills up, a folder made read-only while the command ran
        print(f"rdc: error: {exc}", file=sys.stderr)
        return 1
    finally:  # a command's Ctrl-C handling (_StopOnSignals) ends with it (main may run in-process)
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())

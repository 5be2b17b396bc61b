"""Bundle a trained run as a shipped model: set its classifier defaults, measure it, copy it.

Measures validation accuracy (the split the defaults were chosen on) and test accuracy
with the chosen classifier settings, writes them into the model card together with the
exact commands, and copies weights + card to resources/models/NAME.*.

    python scripts/bundle_model.py --run runs/emb --name mnist-embedding --steps 8 \
        --weighting edm --sigma-min 0.2 --sigma-max 10 --screen-levels 4 --keep-classes 3 \
        --val-n 1000 --test-n 1000

``--card-only`` updates the JSON card of an already bundled model (purification defaults,
sample agreement, purification sweep) without re-measuring or re-saving its weights, so the
weights' sha256, which robustness.json rows are keyed on, stays; the command is appended to
the card's ``metrics.card_updates``:

    python scripts/bundle_model.py --card-only --name mnist-embedding --purify-eta 0.1 \
        --purify-step-size 0.04 --purify-sigma 0.4,0.6 --purify-note "..." \
        --purify-sweep benchmarks/results/purify-sweep-mnist-embedding.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier
from rdc_studio.core.data import load_dataset
from rdc_studio.core.defense import parse_fraction
from rdc_studio.core.evaluate import evaluate_clean, hardware_description, wilson_interval
from rdc_studio.core.models import (BUNDLED_DIR, load_checkpoint, read_card, save_checkpoint,
                                    update_card_entries)
from rdc_studio.core.purify import PurifySettings


def measure(clf: DiffusionClassifier, dataset: str, split: str, n: int, data_root) -> dict:
    """Clean accuracy of ``clf`` on the first ``n`` images of ``dataset``'s ``split``."""
    ds = load_dataset(dataset, split, data_root)
    last = None
    for last in evaluate_clean(clf, ds, n, batch_size=50):
        print(f"  {split}: {last.done}/{last.total} acc {last.accuracy:.4f}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    lo, hi = wilson_interval(last.correct, last.done)
    return {"split": split, "n": last.done, "accuracy": last.accuracy, "ci95": [lo, hi],
            "seconds_per_image": last.elapsed_seconds / last.done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="run directory holding model.safetensors (or a checkpoint path)")
    p.add_argument("--name", required=True)
    p.add_argument("--card-only", action="store_true",
                   help="update the card of the bundled model NAME (the --purify-* options, --agreement, "
                        "--purify-sweep) and leave its weights and measured accuracy as they are")
    p.add_argument("--steps", type=int)
    p.add_argument("--weighting", default="edm")
    p.add_argument("--grid", default="quantile", help="placement of the noise levels (quantile, log, uniform)")
    p.add_argument("--sigma-min", type=float)
    p.add_argument("--sigma-max", type=float)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--screen-levels", type=int, default=0,
                   help="progressive class elimination: levels spent on all classes (0 = none)")
    p.add_argument("--keep-classes", type=int, default=0,
                   help="progressive class elimination: classes kept for the remaining levels")
    p.add_argument("--val-n", type=int, default=1000)
    p.add_argument("--test-n", type=int, default=1000)
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--note", default="", help="how the settings were chosen")
    p.add_argument("--training-command", action="append", default=[],
                   help="every command of a resumed run, in order (repeat the flag); default: the card's")
    p.add_argument("--purify-eta", default=None, help="likelihood-maximisation radius (e.g. 0.3 or 8/255)")
    p.add_argument("--purify-steps", type=int, default=None)
    p.add_argument("--purify-step-size", default=None)
    p.add_argument("--purify-optimizer", default="sign", choices=["sign", "adam"])
    p.add_argument("--purify-sigma", default=None, metavar="LO,HI",
                   help="noise-level range the likelihood maximisation samples (default: the settings' own)")
    p.add_argument("--purify-note", default="", help="how the purification defaults were chosen")
    p.add_argument("--agreement", default=None, metavar="JSON",
                   help="the summary benchmarks/sample_agreement.py wrote for this model, kept in the card")
    p.add_argument("--purify-sweep", default=None, metavar="JSON",
                   help="the report scripts/purify_sweep.py wrote when the purification defaults were chosen")
    args = p.parse_args(argv)
    command = "python scripts/bundle_model.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.card_only:
        return update_bundled_card(args, command, p)
    missing = [f"--{k.replace('_', '-')}" for k in ("run", "steps", "sigma_min", "sigma_max")
               if getattr(args, k) is None]
    if missing:
        p.error(f"the following arguments are required (unless --card-only): {', '.join(missing)}")
    torch.set_num_threads(args.threads)
    src = Path(args.run)
    src = src / "model.safetensors" if src.is_dir() else src
    model = load_checkpoint(src)
    if model.card.get("purifier"):  # its card names the purifier by a path relative to the card
        p.error(f"--run {args.run}: a classifier with its own purifier cannot be bundled by this script "
                f"(the purifier's file would be left behind)")
    dataset = model.card.get("dataset") or "mnist"
    settings = ClassifierSettings(steps=args.steps, weighting=args.weighting, sigma_min=args.sigma_min,
                                  sigma_max=args.sigma_max, bf16=args.bf16, grid=args.grid,
                                  screen_levels=args.screen_levels, keep_classes=args.keep_classes)
    dst = BUNDLED_DIR / f"{args.name}.safetensors"
    t0 = time.perf_counter()
    clf = DiffusionClassifier(model.net, settings)
    val = measure(clf, dataset, "val", args.val_n, args.data_root)
    test = measure(clf, dataset, "test", args.test_n, args.data_root)
    card = dict(model.card)
    card["name"] = args.name
    card["classifier"] = settings.to_dict()
    if args.training_command:
        card["training_commands"] = list(args.training_command)
    card["metrics"] = {
        "val": val, "test": test, "hardware": hardware_description(),
        "measured_by": command,
        "settings_choice": args.note,
        "measure_seconds": round(time.perf_counter() - t0, 1),
    }
    add_card_extras(card, args)
    save_checkpoint(dst, model.net, card)
    print(json.dumps(card["metrics"], indent=2))
    print(f"bundled {dst}")
    return 0


def add_card_extras(card: dict, args: argparse.Namespace) -> None:
    """Put the sample agreement, purification sweep and purification defaults of ``args``
    (those given) into ``card``."""
    metrics = card.setdefault("metrics", {})
    for key, path in (("sample_agreement", args.agreement), ("purify_sweep", args.purify_sweep)):
        if path:
            metrics[key] = json.loads(Path(path).read_text())
    if args.purify_eta is not None:
        sigma = {}
        if args.purify_sigma:
            lo, hi = (float(v) for v in args.purify_sigma.split(","))
            sigma = {"sigma_lo": lo, "sigma_hi": hi}
        given = {"steps": args.purify_steps,
                 "step_size": None if args.purify_step_size is None else parse_fraction(args.purify_step_size)}
        # options not given keep PurifySettings' defaults (a step size of 0 would make purification do nothing)
        purify = PurifySettings(eta=parse_fraction(args.purify_eta), optimizer=args.purify_optimizer, **sigma,
                                **{k: v for k, v in given.items() if v is not None})
        card["purify"] = purify.to_dict()
        metrics["purify_choice"] = args.purify_note


def update_bundled_card(args: argparse.Namespace, command: str, parser: argparse.ArgumentParser) -> int:
    """``--card-only``: rewrite the JSON card of the bundled model ``args.name`` (weights untouched)."""
    weights = BUNDLED_DIR / f"{args.name}.safetensors"
    if not weights.exists():
        parser.error(f"--card-only: no bundled model {args.name!r} ({weights} does not exist)")
    if args.purify_eta is None and not (args.agreement or args.purify_sweep):
        parser.error("--card-only: nothing to update (give --purify-eta, --agreement or --purify-sweep)")
    card = read_card(weights)
    add_card_extras(card, args)
    card["metrics"]["card_updates"] = card["metrics"].get("card_updates", []) + [command]
    update_card_entries(weights, {key: card[key] for key in ("metrics", "purify") if key in card})
    print(f"updated the card {weights.with_suffix('.json')} (weights unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``rdc`` command line: train, classify, eval."""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from pathlib import Path

import torch


def _command_line() -> str:
    return "rdc " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load_dataset
    from .nets import NetConfig
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, args.split, args.data_root)
    channels = 1 if args.dataset == "mnist" else 3
    size = 28 if args.dataset == "mnist" else 32
    net_cfg = NetConfig(
        architecture=args.arch, image_size=size, in_channels=channels, num_classes=len(ds.classes),
        channels=_int_tuple(args.channels), blocks_per_level=args.blocks, emb_dim=args.emb_dim,
        head_channels=_int_tuple(args.head_channels), dropout=args.dropout,
    )
    train_cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay,
        bf16=not args.fp32, seed=args.seed, checkpoint_minutes=args.checkpoint_minutes,
        threads=args.threads, max_minutes=args.max_minutes,
    )
    stop = {"flag": False}

    def _on_signal(signum, frame):  # finish the step, save state, exit
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    extra = {"training_command": _command_line(), "data": f"{args.dataset} {args.split} split (data root {args.data_root or 'RDC_DATA_ROOT'})"}
    bar = None
    for rec in train(ds, net_cfg, train_cfg, args.out, card_extra=extra, should_stop=lambda: stop["flag"],
                     device=args.device, log_every=args.log_every):
        if bar is None:
            bar = tqdm(total=rec.total_steps, initial=rec.step - args.log_every, unit="step", dynamic_ncols=True,
                       mininterval=5, file=sys.stderr)
        bar.n = rec.step
        bar.set_postfix(loss=f"{rec.loss:.4f}", ips=f"{rec.images_per_second:.0f}", ep=f"{rec.epoch:.2f}")
        bar.refresh()
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(rec.__dict__) + "\n")
    if bar is not None:
        bar.close()
    if stop["flag"]:
        print(f"stopped; state saved in {args.out} (re-run the same command to resume)", file=sys.stderr)
        return 130
    print(f"wrote {Path(args.out) / 'model.safetensors'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdc", description="Robust Diffusion Classifier engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a diffusion classifier (resumable)")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--data-root", default=None, help="dataset root (default: RDC_DATA_ROOT or ../shared/data)")
    p.add_argument("--split", default="train", choices=["train", "train-full"])
    p.add_argument("--out", required=True, help="run directory (resumes if it holds a state)")
    p.add_argument("--arch", choices=["multihead", "embedding"], default="multihead")
    p.add_argument("--channels", default="32,64,128")
    p.add_argument("--head-channels", default="16,8", help="multi-head: per-class branch widths (coarse to fine)")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--emb-dim", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--fp32", action="store_true", help="disable bfloat16 autocast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time and write the model")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--log", default=None, help="append JSON lines of step records here")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

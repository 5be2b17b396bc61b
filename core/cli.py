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


_ARGV: list[str] = []
GRAD_HELP = ("rdc: auto (the default: smooth for sign-step LM, exact for Adam), exact (through the LM steps), "
             "smooth (exact, with a tanh surrogate in the backward pass of the sign steps) or bpda (identity "
             "through the LM)")


def _command_line() -> str:
    """The command as the user typed it (for model cards and reports)."""
    return "rdc " + " ".join(shlex.quote(a) for a in _ARGV)


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load_dataset
    from .nets import NetConfig
    from .train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    init_net, init_name = None, None
    if args.init_from:
        from .models import load_checkpoint

        init_model = load_checkpoint(args.init_from)
        if init_model.card.get("dataset") != args.dataset:
            raise ValueError(f"--init-from {args.init_from}: a {init_model.card.get('dataset')} model, not {args.dataset}")
        init_net, init_name = init_model.net, init_model.name
        net_cfg = NetConfig.from_dict(init_model.net.config.to_dict())
    ds = load_dataset(args.dataset, args.split, args.data_root)
    if args.limit:
        ds.images, ds.labels = ds.images[: args.limit], ds.labels[: args.limit]
    channels = 1 if args.dataset == "mnist" else 3
    size = 28 if args.dataset == "mnist" else 32
    if init_net is None:
        net_cfg = NetConfig(
            architecture=args.arch, image_size=size, in_channels=channels, num_classes=len(ds.classes),
            channels=_int_tuple(args.channels), blocks_per_level=args.blocks, emb_dim=args.emb_dim,
            head_channels=_int_tuple(args.head_channels), dropout=args.dropout,
        )
    train_cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        bf16=args.bf16, seed=args.seed, checkpoint_minutes=args.checkpoint_minutes,
        threads=args.threads, max_minutes=args.max_minutes, ce_weight=args.ce_weight,
        ce_sigma_min=args.ce_sigma_min, ce_sigma_max=args.ce_sigma_max,
    )
    stop = {"flag": False}

    def _on_signal(signum, frame):  # finish the step, save state, exit
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    extra = {"training_command": _command_line(), "data": f"{args.dataset} {args.split} split (data root {args.data_root or 'RDC_DATA_ROOT'})"}
    bar = None
    for rec in train(ds, net_cfg, train_cfg, args.out, card_extra=extra, should_stop=lambda: stop["flag"],
                     device=args.device, log_every=args.log_every, init_from=init_net, init_name=init_name):
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
            with open(args.log, "a") as f:
                f.write(json.dumps(rec.__dict__) + "\n")
    if bar is not None:
        bar.close()
    if stop["flag"]:
        print(f"stopped; state saved in {args.out} (re-run the same command to resume)", file=sys.stderr)
        return 130
    print(f"wrote {Path(args.out) / 'model.safetensors'}")
    return 0


def resolve_device(name: str) -> str:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rdc: error: --device cuda requested but CUDA is not available")
    return name


def _classifier_overrides(args: argparse.Namespace) -> dict:
    return {"steps": args.dc_steps, "weighting": args.weighting, "sigma_min": args.sigma_min,
            "sigma_max": args.sigma_max, "mode": args.mode, "noise_seed": args.noise_seed,
            "screen_levels": args.screen_levels, "keep_classes": args.keep_classes}


def _add_classifier_args(p: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
    p.add_argument("--model", default=None, help="bundled model name or checkpoint path (default: the bundled default)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(steps_flag, dest="dc_steps", type=int, default=None,
                   help="classifier noise levels T (default: the model card's)")
    p.add_argument("--weighting", choices=["elbo", "edm"], default=None)
    p.add_argument("--sigma-min", type=float, default=None)
    p.add_argument("--sigma-max", type=float, default=None)
    p.add_argument("--mode", choices=["deterministic", "randomized"], default=None)
    p.add_argument("--noise-seed", type=int, default=None)
    p.add_argument("--screen-levels", type=int, default=None,
                   help="progressive class elimination: levels spent on all classes before the leading "
                        "--keep-classes get the rest (default: the model card's; 0 = off)")
    p.add_argument("--keep-classes", type=int, default=None,
                   help="classes kept after the screening levels (default: the model card's; 0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: one per core)")


def _setup_threads(args: argparse.Namespace) -> None:
    import os

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))


def _load(args: argparse.Namespace):
    from .classifier import build_classifier
    from .models import CheckpointError, load_checkpoint

    device = resolve_device(args.device)
    try:
        model = load_checkpoint(args.model, device=device)
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    return model, build_classifier(model, device, **_classifier_overrides(args))


def cmd_classify(args: argparse.Namespace) -> int:
    from .baseline import is_cnn_checkpoint, load_cnn
    from .images import ImageLoadError, load_for_model

    _setup_threads(args)
    if is_cnn_checkpoint(args.model):  # the discriminative baseline, e.g. to judge samples
        from .models import CheckpointError

        device = resolve_device(args.device)
        try:
            classify, card = load_cnn(args.model, device=device)
        except CheckpointError as exc:
            raise SystemExit(f"rdc: error: {exc}") from None
        name, classes, settings = card["name"], list(card["classes"]), None
        image_size, channels = card["image_size"], card["in_channels"]
    else:
        model, classify = _load(args)
        device, name, classes = classify.device, model.name, model.classes
        settings = classify.settings.to_dict()
        image_size, channels = model.net.config.image_size, model.net.config.in_channels
    results, status = [], 0
    for path in args.images:
        try:
            arr = load_for_model(path, image_size, channels)
        except ImageLoadError as exc:
            print(f"rdc: error: {exc}", file=sys.stderr)
            results.append({"image": path, "error": str(exc)})
            status = 1
            continue
        x = torch.from_numpy(arr).unsqueeze(0).to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = classify(x)[0]
        seconds = time.perf_counter() - t0
        probs = torch.softmax(logits, 0).cpu()
        pred = int(probs.argmax())
        results.append({"image": path, "predicted": pred, "class": classes[pred],
                        "confidence": float(probs[pred]), "probabilities": dict(zip(classes, map(float, probs))),
                        "logits": [float(v) for v in logits.cpu()], "seconds": seconds})
        if not args.json:
            bars = "  ".join(f"{c}:{p:.3f}" for c, p in zip(classes, probs.tolist()))
            print(f"{path}: {classes[pred]} ({float(probs[pred]):.1%})  [{bars}]  {seconds * 1000:.0f} ms")
    if args.json:
        print(json.dumps({"model": name, "settings": settings, "results": results}, indent=2))
    return status


def _init_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """Under ``torchrun`` join the process group (gloo on CPU, NCCL on GPU); else (0, 1)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and resolve_device(args.device) == "cuda" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load_dataset
    from .evaluate import clean_report, evaluate_attack, evaluate_clean, evaluate_ensemble, robust_log, robust_report
    from .models import atomic_write_bytes, atomic_write_json

    _setup_threads(args)
    ds = load_dataset(args.dataset, args.split, args.data_root)
    if args.defense == "cnn":  # the diffusion model is not needed
        model, clf = None, None
        device = resolve_device(args.device)
        settings = {"device": device}
        model_info = {"name": args.cnn, "architecture": "cnn"}
    else:
        model, clf = _load(args)
        if ds.name != model.card.get("dataset"):
            raise SystemExit(f"rdc: error: model {model.name} was trained on {model.card.get('dataset')}, "
                             f"not {ds.name}")
        settings = {"classifier": clf.settings.to_dict(), "device": str(clf.device)}
        model_info = {"name": model.name, "path": str(model.path), "architecture": model.net.config.architecture}
    total = min(args.n or len(ds), len(ds))
    settings.update({"dataset": args.dataset, "split": args.split, "defense": args.defense, "attack": args.attack,
                     "batch_size": args.batch_size, "command": _command_line()})
    steps = []
    if args.attack == "none" and args.defense == "dc":
        with tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr) as bar:
            for rec in evaluate_clean(clf, ds, total, args.batch_size):
                steps.append(rec)
                bar.update(rec.done - bar.n)
                bar.set_postfix(acc=f"{rec.accuracy:.4f}")
        report = clean_report(steps, model_info, settings)
    else:
        from .attacks import AttackSettings

        defense = build_defense(args.defense, model, clf, args)
        if args.defense == "rdc":
            settings["purify"] = _purify_settings(model, args).to_dict()
            settings["grad"] = args.grad
        members, surrogate = None, None
        if args.attack == "none":
            att = AttackSettings(eps=0.0, steps=1, random_start=False)
        elif args.attack in ("ensemble", "transfer"):
            members, surrogate = _ensemble(args, ds)
            if args.attack == "transfer":  # the ensemble's transfer attack alone
                members = [m for m in members if m.transfer]
        else:
            att = _single_attack_settings(args)
        if members is not None:
            settings["attack_settings"] = {m.name: m.settings.to_dict() for m in members}
            settings["ensemble"] = {"order": [m.name for m in members], "transfer_source": args.cnn}
            if args.attack == "ensemble":
                settings["ensemble"]["targets"] = args.targets
            seeds = {"attack_seed": args.seed,
                     "classifier_noise_seed": settings.get("classifier", {}).get("noise_seed"),
                     "per_example": "(attack_seed * 1000003 + index) * 101 + restart"}
        else:
            settings["attack_settings"] = att.to_dict()
        rank, world = _init_distributed(args)
        indices = list(range(total))[rank::world]
        state = None
        if args.state:
            from .evaluate import ResumeState

            state_path = args.state if world == 1 else f"{args.state}.rank{rank}-of-{world}"
            try:
                identity = {k: v for k, v in settings.items() if k != "command"}
                state = ResumeState(state_path, identity | {"n": total, "shard": [rank, world]})
            except ValueError as exc:
                raise SystemExit(f"rdc: error: {exc}") from None
        results = list(state.results.values()) if state else []
        t0 = time.perf_counter()
        skip = set(state.results) if state else frozenset()
        if members is not None:
            records = evaluate_ensemble(defense, ds, members, indices, args.batch_size, skip=skip, surrogate=surrogate)
        else:
            records = evaluate_attack(defense, ds, att, indices, args.batch_size, skip=skip)
        attack_seconds: dict[str, float] = {}
        attack_queries: dict[str, int] = {}
        with tqdm(total=len(indices), unit="img", dynamic_ncols=True, file=sys.stderr, disable=rank != 0,
                  initial=len(results)) as bar:
            for rec in records:
                results.extend(rec.results)
                for name, sec in rec.attack_seconds.items():
                    attack_seconds[name] = attack_seconds.get(name, 0.0) + sec
                for name, q in rec.attack_queries.items():
                    attack_queries[name] = attack_queries.get(name, 0) + q
                if state:
                    state.add(rec.results)
                bar.update(len(rec.results))
                bar.set_postfix(clean=f"{sum(r.clean_correct for r in results) / len(results):.3f}",
                                robust=f"{sum(r.robust_correct for r in results) / len(results):.3f}")
        if world > 1:
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, (results, attack_seconds, attack_queries))
            results = [r for part, _, _ in gathered for r in part]
            attack_seconds = {m.name: sum(sec.get(m.name, 0.0) for _, sec, _ in gathered) for m in members or []}
            attack_queries = {m.name: sum(q.get(m.name, 0) for _, _, q in gathered) for m in members or []}
            settings["shards"] = world
        if members is not None:
            report = robust_report(results, time.perf_counter() - t0, model_info, settings,
                                   attacks=[(m.name, m.label) for m in members], attack_seconds=attack_seconds,
                                   attack_queries=attack_queries, seeds=seeds)
        else:
            report = robust_report(results, time.perf_counter() - t0, model_info, settings)
        if rank != 0:
            return 0
        if args.log:
            atomic_write_bytes(args.log, robust_log(report).encode())
    if args.out:
        atomic_write_json(args.out, report)
    lo, hi = report["ci95"]
    line = (f"clean accuracy {report['clean_acc']:.4f} on n={report['n']} (95% CI {lo:.4f}-{hi:.4f})")
    if "robust_acc" in report:
        rlo, rhi = report["robust_ci95"]
        line += f", robust accuracy {report['robust_acc']:.4f} (95% CI {rlo:.4f}-{rhi:.4f})"
    for row in report.get("per_attack", []):
        print(f"robust accuracy after {row['label']}: {row['robust_acc']:.4f} ({row['success']} broken)")
    print(line + f", {report['seconds_per_image'] * 1000:.0f} ms/image")
    return 0


def _single_attack_settings(args: argparse.Namespace):
    """The :class:`core.attacks.AttackSettings` of ``--attack NAME`` (not the ensemble)."""
    from .attacks import AttackSettings

    method, loss = ATTACKS[args.attack]
    steps = args.square_queries if method == "square" and args.square_queries else args.steps
    return AttackSettings(method=method, loss=loss, norm=args.norm, eps=parse_fraction(args.eps), steps=steps,
                          restarts=args.restarts, eot=args.eot, seed=args.seed, p_init=args.p_init)


def _ensemble(args: argparse.Namespace, ds):
    """The members of ``--attack ensemble`` and the surrogate CNN of its transfer attack."""
    from .attacks import standard_ensemble
    from .baseline import load_cnn
    from .models import CheckpointError

    if args.targets < 1:
        raise SystemExit("rdc: error: --targets must be at least 1")
    try:
        surrogate, _ = load_cnn(args.cnn, device=resolve_device(args.device))
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: transfer attack: {exc}") from None
    shape = (surrogate.in_channels, surrogate.image_size)
    if shape != (ds.images.shape[1], ds.images.shape[-1]) or surrogate.num_classes != len(ds.classes):
        raise SystemExit(f"rdc: error: transfer attack: CNN {args.cnn} does not fit the {ds.name} data")
    members = standard_ensemble(args.norm, parse_fraction(args.eps), steps=args.steps, restarts=args.restarts,
                                eot=args.eot, seed=args.seed, targets=args.targets,
                                square_queries=args.square_queries or 5000, p_init=args.p_init)
    return members, surrogate


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from .images import save_png_atomic
    from .models import CheckpointError, load_checkpoint
    from .sample import sample

    if not args.out and not args.out_dir:
        raise SystemExit("rdc: error: give --out GRID.png, --out-dir DIR, or both")
    if args.out and Path(args.out).suffix.lower() != ".png":
        raise SystemExit("rdc: error: --out must be a .png file")
    _setup_threads(args)
    try:
        model = load_checkpoint(args.model, device=resolve_device(args.device))
    except CheckpointError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    k = model.net.config.num_classes
    if args.label == "all":
        labels: list[int | None] = list(range(k))
    elif args.label == "uncond":
        labels = [None]
    else:
        try:
            labels = [int(args.label)]
        except ValueError:
            raise SystemExit(f"rdc: error: --label must be a class index, 'all' or 'uncond', not {args.label!r}") from None
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    columns = []
    for y in labels:
        last = None
        for last in sample(model.net, y, n=args.n, steps=args.sampler_steps, seed=args.seed + (y or 0)):
            pass
        if out_dir is not None:
            name = "uncond" if y is None else str(y)
            for i, image in enumerate(last.image):
                save_png_atomic(image, out_dir / f"{name}-{i:03d}.png")
        columns.append(np.concatenate(list(last.image), axis=1))  # stack the n samples vertically
    if args.out:
        save_png_atomic(np.concatenate(columns, axis=2), Path(args.out))
        print(f"wrote {args.out} ({len(labels)} column(s) x {args.n} sample(s), {args.sampler_steps} Heun steps)")
    if out_dir is not None:
        print(f"wrote {len(labels) * args.n} PNGs to {out_dir} (LABEL-INDEX.png)")
    return 0


def cmd_train_cnn(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .baseline import save_cnn, train_cnn
    from .data import load_dataset
    from .evaluate import hardware_description, wilson_interval

    _setup_threads(args)
    ds = load_dataset(args.dataset, "train", args.data_root)
    gen = train_cnn(ds, epochs=args.epochs, seed=args.seed)
    t0 = time.perf_counter()
    with tqdm(unit="step", dynamic_ncols=True, file=sys.stderr) as bar:
        while True:
            try:
                rec = next(gen)
            except StopIteration as stop:
                model = stop.value
                break
            bar.total = rec.total_steps
            bar.n = rec.step
            bar.set_postfix(loss=f"{rec.loss:.4f}", acc=f"{rec.accuracy:.4f}")
            bar.refresh()
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


def parse_fraction(text: str) -> float:
    """Parse '0.3' or '8/255'."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _purify_settings(model, args: argparse.Namespace):
    from .purify import PurifySettings

    base = dict(model.card.get("purify", {}))
    if getattr(args, "eta", None) is not None:
        base["eta"] = parse_fraction(args.eta)
    if getattr(args, "lm_step_size", None) is not None:
        base["step_size"] = parse_fraction(args.lm_step_size)
    for key in ("lm_steps", "optimizer"):
        val = getattr(args, key, None)
        if val is not None:
            base["steps" if key == "lm_steps" else key] = val
    return PurifySettings(**base)


def _load_image_tensor(path: str, cfg) -> torch.Tensor:
    from .images import ImageLoadError, load_for_model

    try:
        return torch.from_numpy(load_for_model(path, cfg.image_size, cfg.in_channels)).unsqueeze(0)
    except ImageLoadError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None


def cmd_purify(args: argparse.Namespace) -> int:
    from .images import save_png_atomic
    from .purify import LikelihoodMaximizer

    _setup_threads(args)
    model, clf = _load(args)
    x = _load_image_tensor(args.image, model.net.config).to(clf.device)
    lm = LikelihoodMaximizer(model.net, _purify_settings(model, args))
    t0 = time.perf_counter()
    records = list(lm.run(x, classifier=clf))
    seconds = time.perf_counter() - t0
    final = records[-1] if records else None
    image = final.image[0] if final else x[0].cpu().numpy()
    if args.out:
        save_png_atomic(image, args.out, source=args.image)
    steps = [{"step": r.step, "objective": float(r.objective[0]), "sigma": r.sigma, "linf": float(r.linf[0]),
              "l2": float(r.l2[0]), "probabilities": torch.softmax(torch.from_numpy(r.logits[0]), 0).tolist()}
             for r in records]
    report = {"image": args.image, "out": args.out, "settings": lm.settings.to_dict(),
              "classifier": clf.settings.to_dict(), "steps": steps, "seconds": seconds, "classes": model.classes}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for st in steps:
            p = st["probabilities"]
            top = max(range(len(p)), key=p.__getitem__)
            print(f"step {st['step']:3d}  objective {st['objective']:10.3f}  linf {st['linf']:.4f}  "
                  f"l2 {st['l2']:.3f}  -> {model.classes[top]} ({p[top]:.1%})")
        print(f"{seconds:.2f} s" + (f", wrote {args.out}" if args.out else ""))
    return 0


def cmd_worst_case(args: argparse.Namespace) -> int:
    from .evaluate import run_label, worst_case_log, worst_case_report
    from .models import atomic_write_json

    reports = []
    for path in args.reports:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"rdc: error: cannot read report {path}: {exc}") from None
        if "per_example" not in reports[-1] or "settings" not in reports[-1]:
            raise SystemExit(f"rdc: error: {path} is not an rdc eval attack report")
    try:
        report = worst_case_report(reports, labels=[f"{Path(p).name} ({run_label(r)})"
                                                    for p, r in zip(args.reports, reports)])
    except ValueError as exc:
        raise SystemExit(f"rdc: error: {exc}") from None
    report["reports"] = [str(p) for p in args.reports]
    print(worst_case_log(report), end="")
    if args.out:
        atomic_write_json(args.out, report)
    return 0


def build_defense(kind: str, model, clf, args: argparse.Namespace):
    """The attacked module: ``cnn``, ``dc`` or ``rdc`` (with the chosen gradient mode)."""
    if kind == "cnn":
        from .baseline import load_cnn
        from .models import CheckpointError

        try:
            cnn, _ = load_cnn(args.cnn, device=resolve_device(args.device))
        except CheckpointError as exc:
            raise SystemExit(f"rdc: error: {exc}") from None
        return cnn
    if kind == "dc":
        return clf
    from .rdc import RobustDiffusionClassifier, masked_gradient_warning

    purify = _purify_settings(model, args)
    rdc = RobustDiffusionClassifier(model.net, clf.settings, purify, args.grad).to(clf.device)
    args.grad = rdc.grad_mode  # reports record the mode actually used (auto resolved)
    warning = masked_gradient_warning(args.grad, purify)
    if warning and getattr(args, "attack", None) not in (None, "none", "square", "transfer"):
        print(f"rdc: warning: {warning}", file=sys.stderr)
    return rdc


ATTACKS = {"apgd-ce": ("apgd", "ce"), "apgd-dlr": ("apgd", "dlr"), "apgd-t": ("apgd", "dlr-targeted"),
           "pgd": ("pgd", "ce"), "square": ("square", "margin")}


def cmd_attack(args: argparse.Namespace) -> int:
    import resource

    from .attacks import AttackSettings, attack
    from .images import save_png_atomic
    from .models import atomic_write_json

    _setup_threads(args)
    model, clf = _load(args)
    x = _load_image_tensor(args.image, model.net.config).to(clf.device)
    x = torch.round(x * 255) / 255  # attack the image as it is stored (8-bit)
    defense = build_defense(args.defense, model, clf, args)
    with torch.no_grad():
        clean_logits = defense(x)
    label = int(clean_logits.argmax(1)) if args.label is None else args.label
    method, loss = ATTACKS[args.attack]
    settings = AttackSettings(method=method, loss=loss, norm=args.norm, eps=parse_fraction(args.eps), steps=args.steps,
                              restarts=args.restarts, eot=args.eot, seed=args.seed,
                              step_size=parse_fraction(args.step_size) if args.step_size else None, target=args.target,
                              p_init=args.p_init)
    y = torch.tensor([label], device=x.device)
    t0 = time.perf_counter()
    gen = attack(defense, x, y, settings)
    while True:
        try:
            rec = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        if not args.quiet and (rec.iteration % max(1, args.steps // 10) == 0 or rec.iteration == args.steps):
            print(f"iter {rec.iteration:4d}/{rec.total_iterations}  loss {rec.loss[0]:9.4f}  margin "
                  f"{rec.margin[0]:9.4f}  pred {model.classes[int(rec.prediction[0])]}  "
                  f"linf {rec.linf[0]:.4f}  l2 {rec.l2[0]:.3f}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        adv_logits = defense(result.adversarial)
    adv_pred = int(adv_logits.argmax(1))
    if args.out:
        save_png_atomic(result.adversarial[0].cpu().numpy(), args.out, source=args.image)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "image": args.image, "out": args.out, "defense": args.defense, "attack": args.attack,
        "grad": args.grad if args.defense == "rdc" else None, "settings": settings.to_dict(),
        "classifier": clf.settings.to_dict(),
        "purify": _purify_settings(model, args).to_dict() if args.defense == "rdc" else None,
        "label": label, "label_name": model.classes[label],
        "clean_probabilities": torch.softmax(clean_logits[0], 0).tolist(),
        "adversarial_prediction": adv_pred, "adversarial_class": model.classes[adv_pred],
        "adversarial_probabilities": torch.softmax(adv_logits[0], 0).tolist(),
        "success": bool(result.success[0]), "linf": float(result.linf[0]), "l2": float(result.l2[0]),
        "checks": result.checks, "queries": result.queries, "seconds": seconds,
        "seconds_per_iteration": seconds / (args.steps * args.restarts), "peak_rss_mb": peak_mb,
        "command": _command_line(),
    }
    if args.report:
        atomic_write_json(args.report, report)
    verdict = "attack succeeded" if report["success"] else "attack failed"
    print(f"{verdict}: {model.classes[label]} -> {model.classes[adv_pred]}  linf {report['linf']:.4f} "
          f"l2 {report['l2']:.3f}  {seconds:.1f} s ({report['seconds_per_iteration']:.2f} s/iter), "
          f"peak RSS {peak_mb:.0f} MB")
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
    p.add_argument("--warmup-steps", type=int, default=500, help="linear learning-rate warm-up")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="bfloat16 autocast (fast on GPUs and CPUs with AMX/AVX512-BF16, slow elsewhere)")
    precision.add_argument("--fp32", action="store_true", help="float32 throughout (the default)")
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="hybrid objective: weight of the cross-entropy of the classifier's own logits "
                        "(multi-head; 0 = purely generative)")
    p.add_argument("--ce-sigma-min", type=float, default=0.1,
                   help="hybrid objective: noise levels whose draws enter the cross-entropy term")
    p.add_argument("--ce-sigma-max", type=float, default=10.0)
    p.add_argument("--init-from", default=None, metavar="NAME|PATH",
                   help="fine-tune: start from this checkpoint's weights (its architecture replaces "
                        "--arch/--channels/--head-channels/--blocks/--emb-dim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time and write the model")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--log", default=None, help="append JSON lines of step records here")
    p.add_argument("--limit", type=int, default=0, help="train on the first N examples only (smoke runs)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-cnn", help="train the small discriminative CNN baseline")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors; a .json card is written beside)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=cmd_train_cnn)

    p = sub.add_parser("classify", help="classify image files with the diffusion classifier")
    p.add_argument("images", nargs="+")
    _add_classifier_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("sample", help="generate images of a class with the EDM sampler (a PNG grid)")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default="all", help="class index, 'all' (one column per class) or 'uncond'")
    p.add_argument("--n", type=int, default=4, help="samples per class")
    p.add_argument("--sampler-steps", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write all samples as one PNG grid (a column per class)")
    p.add_argument("--out-dir", default=None,
                   help="write one PNG per sample into this folder, named LABEL-INDEX.png (e.g. 3-007.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("purify", help="likelihood maximisation of one image (the RDC's purification)")
    p.add_argument("image")
    p.add_argument("--eta", default=None, help="l-inf radius in [0,1] units, e.g. 0.3 or 8/255")
    p.add_argument("--steps", dest="lm_steps", type=int, default=None, help="likelihood-maximisation steps N")
    p.add_argument("--step-size", dest="lm_step_size", default=None, help="LM step size in [0,1] units")
    p.add_argument("--optimizer", choices=["sign", "adam"], default=None)
    p.add_argument("--out", default=None, help="write the purified image here (PNG)")
    p.add_argument("--json", action="store_true")
    _add_classifier_args(p, steps_flag="--levels")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("attack", help="craft an adversarial example against a defense")
    p.add_argument("image")
    p.add_argument("--defense", choices=["rdc", "dc", "cnn"], default="rdc")
    p.add_argument("--attack", choices=sorted(ATTACKS), default="apgd-ce")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--eps", default="0.3", help="radius in [0,1] units, e.g. 0.3 or 8/255")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--step-size", default=None, help="PGD step size (APGD adapts its own)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--eot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--p-init", type=float, default=0.8, help="square: initial fraction of pixels per square")
    p.add_argument("--label", type=int, default=None, help="true class (default: the clean prediction)")
    p.add_argument("--target", type=int, default=None, help="apgd-t target class (default: runner-up)")
    p.add_argument("--grad", choices=["auto", "exact", "smooth", "bpda"], default="auto", help=GRAD_HELP)
    p.add_argument("--cnn", default="mnist-cnn", help="CNN checkpoint for --defense cnn")
    p.add_argument("--eta", default=None)
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--lm-step-size", default=None)
    p.add_argument("--optimizer", choices=["sign", "adam"], default=None)
    p.add_argument("--out", default=None, help="adversarial PNG (8-bit, lossless)")
    p.add_argument("--report", default=None, help="JSON report")
    p.add_argument("--quiet", action="store_true")
    _add_classifier_args(p, steps_flag="--levels")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("eval", help="evaluate accuracy on a dataset split")
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--n", "--num-examples", dest="n", type=int, default=None,
                   help="first N examples (default: all); spell it --num-examples under torchrun")
    p.add_argument("--defense", choices=["dc", "rdc", "cnn"], default="dc",
                   help="dc: diffusion classifier; rdc: likelihood maximisation + dc; cnn: the baseline")
    p.add_argument("--attack", choices=["none", "ensemble", "transfer"] + sorted(ATTACKS), default="none",
                   help="ensemble: APGD-CE, APGD-DLR, targeted APGD-DLR, Square and a transfer attack from --cnn, "
                        "each on the examples still unbroken (AutoAttack style); transfer: the ensemble's transfer "
                        "attack alone (APGD-CE crafted on --cnn)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--eps", default="0.3")
    p.add_argument("--steps", type=int, default=100, help="attack iterations (APGD, PGD; Square: queries)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--eot", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", type=int, default=9,
                   help="ensemble: target classes of targeted APGD-DLR (the top runner-up classes)")
    p.add_argument("--square-queries", type=int, default=None,
                   help="Square iterations (default: 5000 in the ensemble, --steps for --attack square)")
    p.add_argument("--p-init", type=float, default=0.8, help="Square: initial fraction of pixels per square")
    p.add_argument("--grad", choices=["auto", "exact", "smooth", "bpda"], default="auto", help=GRAD_HELP)
    p.add_argument("--cnn", default="mnist-cnn",
                   help="CNN checkpoint: --defense cnn, and the ensemble's transfer source")
    p.add_argument("--eta", default=None)
    p.add_argument("--lm-steps", type=int, default=None)
    p.add_argument("--lm-step-size", default=None)
    p.add_argument("--optimizer", choices=["sign", "adam"], default=None)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--state", default=None, help="per-example results file: an interrupted run resumes from it")
    p.add_argument("--out", default=None, help="write the JSON report here (atomically)")
    p.add_argument("--log", default=None,
                   help="attack evaluations: write a readable AutoAttack-style log here (atomically, at the end)")
    _add_classifier_args(p, steps_flag="--levels")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("worst-case", help="per-example worst case over several rdc eval reports of one model",
                       description="An example counts as robust only if every report left it robust (e.g. the "
                                   "exact, smooth and BPDA evaluations of the RDC). Taken over the examples all "
                                   "reports share.")
    p.add_argument("reports", nargs="+", help="rdc eval --out JSON reports (two or more)")
    p.add_argument("--out", default=None, help="write the combined JSON report here (atomically)")
    p.set_defaults(func=cmd_worst_case)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    args = parser.parse_args(argv)
    from .data import DatasetNotFoundError

    try:
        return int(args.func(args) or 0)
    except DatasetNotFoundError as exc:  # engine errors that are the user's to fix: one line
        print(f"rdc: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoint format and the registry of bundled models.

A model is two files side by side: ``NAME.safetensors`` (weights; the JSON config is
also embedded in its metadata) and ``NAME.json`` (config and model card: architecture,
dataset, classes, image size, classifier defaults, training command, metrics). Loading
never unpickles anything.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .nets import Denoiser, NetConfig, build_denoiser

FORMAT = "rdc-studio/diffusion-classifier"
CNN_FORMAT = "rdc-studio/cnn"
"""The card format of a CNN baseline (:mod:`core.baseline`): not a diffusion model."""
FORMAT_VERSION = 1


def resource_dir(name: str) -> Path:
    """A folder of the installed ``rdc_studio.resources`` package (``models``, ``samples``).

    Read through :mod:`importlib.resources`, so it works from a wheel, an editable install
    and a source checkout alike.
    """
    from importlib.resources import files

    return Path(str(files("rdc_studio.resources") / name))


BUNDLED_DIR = resource_dir("models")
DEFAULT_MODEL = "mnist-embedding"


class CheckpointError(ValueError):
    """A file is not a valid RDC Studio checkpoint; the message names file and problem."""


@dataclass
class LoadedModel:
    """A denoiser with its card (config + metadata) and where it came from.

    ``purifier`` is the separate model whose unconditional denoiser the likelihood
    maximisation uses, when the card names one (the RDC paper pairs EDM's conditional
    CIFAR-10 model, the classifier, with its unconditional one, the purifier); None when
    the model purifies with its own unconditional head.
    """

    net: Denoiser
    card: dict[str, Any]
    path: Path
    purifier: LoadedModel | None = None

    @property
    def name(self) -> str:
        return self.card.get("name", self.path.stem)

    @property
    def purifier_net(self) -> Denoiser:
        """The denoiser the likelihood maximisation uses: the purifier's, else this model's."""
        return self.purifier.net if self.purifier is not None else self.net

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def classifier_defaults(self) -> dict[str, Any]:
        return dict(self.card.get("classifier", {}))


def publish_file(tmp: str | Path, path: str | Path) -> None:
    """Give a finished temporary file the usual permissions (0666 minus umask) and
    rename it over ``path`` atomically (``mkstemp`` creates files readable by the owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


STALE_PART_SECONDS = 3600
"""A temporary ``*.part`` file not written for this long is a leftover of a killed writer."""


def _remove_stale_parts(path: Path) -> None:
    """Remove the temporary files that writers of ``path`` killed mid-write (SIGKILL, power
    loss) left beside it: ``.NAME.XXXXXXXX.part`` (and ``NAMEXXXXXXXX.part``, the older naming)
    not modified for :data:`STALE_PART_SECONDS`. ``mkstemp``'s eight random characters hold no
    dot, so the patterns match the temporary files of ``path`` and of no other file."""
    random_part = "[a-z0-9_]" * 8
    now = time.time()
    name = glob.escape(path.name)
    for pattern in (f".{name}.{random_part}.part", f"{name}{random_part}.part"):
        for leftover in path.parent.glob(pattern):
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                if leftover.is_file() and now - leftover.stat().st_mtime > STALE_PART_SECONDS:
                    leftover.unlink()


@contextlib.contextmanager
def replacing_file(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write in the block; when the block ends without an
    error it is renamed over ``path`` (:func:`publish_file`), otherwise removed, so ``path`` is
    never half-written. Leftovers of earlier writers of ``path`` that were killed before they
    could clean up are removed first (:data:`STALE_PART_SECONDS`).

    Examples
    --------
    >>> with replacing_file("out/a.bin") as tmp:  # doctest: +SKIP
    ...     tmp.write_bytes(b"data")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        publish_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DEFENSE_CARD_KEYS = ("classifier", "purify", "preset", "purifier")
"""The model-card entries that configure the defenses built on a model (the diffusion
classifier's grid and elimination, the purification, the named preset, the purifier)."""


def defense_settings_sha256(card: Mapping[str, Any]) -> str:
    """The sha256 (hex) of the card entries :data:`DEFENSE_CARD_KEYS`, canonically serialised.

    Together with the weights' sha256 it identifies the DC and RDC a model's card deploys: a
    re-chosen grid or purification changes this digest but not the weights file.
    """
    entries = {key: card.get(key) for key in DEFENSE_CARD_KEYS}
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def purifier_entry(card_weights: str | Path, purifier_weights: str | Path) -> dict[str, str]:
    """The ``purifier`` entry of a model card: the purifier's weights file relative to the
    card's folder, and its sha256 (checked when the pair is loaded)."""
    card_weights, purifier_weights = Path(card_weights), Path(purifier_weights).with_suffix(".safetensors")
    rel = os.path.relpath(purifier_weights.resolve(), card_weights.resolve().parent)
    return {"path": Path(rel).as_posix(), "sha256": file_sha256(purifier_weights)}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (:func:`replacing_file`)."""
    with replacing_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


MAX_CARD_BYTES = 16 * 2**20  # far above any card (the bundled ones are a few tens of kB)


def read_json_object(path: str | Path, what: str, error: type[Exception] = ValueError,
                     max_bytes: int = MAX_CARD_BYTES) -> dict[str, Any]:
    """A small JSON file that must hold an object (a model card, a session, a run state).

    The file is read only when it is a regular file of at most ``max_bytes`` (a link to a
    device such as /dev/zero would otherwise be read forever).

    Parameters
    ----------
    path : str or Path
        The file.
    what : str
        What the file is, for the messages ("model card", "session file", ...).
    error : type of Exception
        The exception raised on failure, with a one-line message that names the file.
    max_bytes : int
        The largest file accepted.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise error(f"{path}: no such file (the {what})")
        if not path.is_file():  # a folder, or a device behind a link
            raise error(f"{path}: the {what} is not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes is too large for a {what}")
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: the {what} is not valid JSON ({exc})") from None
    except RecursionError:
        raise error(f"{path}: the {what} is not valid JSON (nested too deeply)") from None
    except OSError as exc:
        raise error(f"{path}: the {what} cannot be read ({exc})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: the {what} is a JSON {type(obj).__name__}, not an object")
    return obj


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                        before_publish: Callable[[], None] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file, then rename.

    ``before_publish``, if given, runs once the temporary file is complete and before the
    rename (to write a companion file only after the slow, failure-prone write succeeded).
    """
    with replacing_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        if before_publish is not None:
            before_publish()


TENSORS_DIGEST_KEY = "tensors_sha256"
"""The card entry that ties a JSON card to the weights it was written with (see
:func:`save_weights_and_card`)."""


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The sha256 (hex) of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_weights_and_card(path: Path, tensors: dict[str, torch.Tensor], card: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors, the card embedded) and its JSON card beside it as a pair.

    Both copies of the card record :func:`tensors_sha256` of the weights. The weights are
    written to a temporary file first, then the card is replaced, then the weights: a
    failed write leaves the old pair, and an interruption between the two renames leaves
    a card whose digest differs from the one embedded in the weights, which loading
    refuses (:func:`check_card_matches_weights`) instead of pairing new weights with an
    old card or the reverse.
    """
    card = dict(card)
    card[TENSORS_DIGEST_KEY] = tensors_sha256(tensors)
    atomic_save_tensors(path, tensors, metadata={"rdc_card": json.dumps(card)},
                        before_publish=lambda: atomic_write_json(path.with_suffix(".json"), card))
    return path


def save_checkpoint(path: str | Path, net: Denoiser, card: dict[str, Any]) -> Path:
    """Save ``net`` weights to ``path`` (.safetensors) and ``card`` beside it (.json)."""
    path = Path(path).with_suffix(".safetensors")
    card = dict(card)
    card["format"] = FORMAT
    card["format_version"] = FORMAT_VERSION
    card["net"] = net.config.to_dict()
    card.setdefault("name", path.stem)
    return save_weights_and_card(path, net.state_dict(), card)


def update_card(name_or_path: str | Path, key: str, value: Any) -> Path:
    """Set ``card[key] = value`` in a checkpoint's JSON model card, atomically.

    See :func:`update_card_entries`.

    Returns
    -------
    Path
        The card written.
    """
    return update_card_entries(name_or_path, {key: value})


def update_card_entries(name_or_path: str | Path, entries: Mapping[str, Any]) -> Path:
    """Set several top-level entries of a checkpoint's JSON model card in one atomic write.

    The card beside the weights is read as it is on disk (or, when there is none, the
    card embedded in the weights) and written back through a temporary file and
    ``os.replace``, so a reader sees the old card or the new one, never a partial file.
    The embedded copy in the weights is left as it was (the JSON card takes precedence).

    Returns
    -------
    Path
        The card written.
    """
    weights = resolve_model_path(name_or_path)
    card = _read_card(weights)
    card.update(entries)
    side = weights.with_suffix(".json")
    atomic_write_json(side, card)
    return side


def read_card(name_or_path: str | Path | None = None) -> dict[str, Any]:
    """A checkpoint's model card (validated, weights not loaded): its JSON file, else the embedded copy."""
    return _read_card(resolve_model_path(name_or_path))


def _embedded_card(weights: Path, required: bool = True) -> Any:
    """The card stored in the weights' safetensors metadata (any JSON value; checked by the
    caller); None when there is none and it is not ``required``."""
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a safetensors file ({exc})") from exc
    if "rdc_card" not in meta:
        if not required:
            return None
        raise CheckpointError(f"{weights}: no model card (neither {weights.with_suffix('.json').name} nor "
                              f"embedded metadata)")
    try:
        return json.loads(meta["rdc_card"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{weights}: the embedded model card is not valid JSON ({exc})") from exc


def check_card_matches_weights(weights: Path, card: Mapping[str, Any]) -> None:
    """Refuse a JSON card written for other weights than those beside it.

    A card records the digest of the weights it was saved with (:data:`TENSORS_DIGEST_KEY`;
    cards written before it existed record none and are accepted). The digest embedded in
    the weights must be the same, else the pair is torn (a save interrupted between the
    two files, or one of them copied over from elsewhere).
    """
    expected = card.get(TENSORS_DIGEST_KEY)
    if expected is None:
        return
    try:
        embedded = _embedded_card(weights, required=False)
    except CheckpointError:  # unreadable: the loader says why
        return
    found = embedded.get(TENSORS_DIGEST_KEY) if isinstance(embedded, dict) else None
    if found != expected:
        side = weights.with_suffix(".json").name
        found_text = f"weights {found[:12]}" if isinstance(found, str) else "weights that record no digest"
        raise CheckpointError(f"{weights}: the card {side} was written for other weights (card {str(expected)[:12]}, "
                              f"{found_text}): a save was interrupted between the two files, or one was replaced; "
                              f"save the model again, or delete {side} to use the card embedded in the weights")


def _read_card(weights: Path) -> dict[str, Any]:
    side = weights.with_suffix(".json")
    if side.exists():
        card = read_json_object(side, "model card", CheckpointError)
        check_card_matches_weights(weights, card)
    else:
        card = _embedded_card(weights)
    if isinstance(card, dict) and card.get("format") == CNN_FORMAT:
        raise CheckpointError(f"{weights}: the CNN baseline (a discriminative classifier), not a diffusion model; "
                              f"use it with rdc classify --model or as an attack's --cnn")
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: model card does not declare format {FORMAT!r}")
    for key in ("net", "classes"):
        if key not in card:
            raise CheckpointError(f"{weights}: model card lacks {key!r}")
    _check_card_types(weights, card)
    return card


def _check_card_types(weights: Path, card: dict[str, Any]) -> None:
    """The card's entries have the types the code reads them as (values are checked where
    they are used: the network config, classifier and purification settings)."""
    classes = card["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{weights}: the card's classes must be a list of names, not {classes!r:.80}")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"{weights}: the card names a class twice")
    for key, kind, what in (("net", dict, "an object"), ("classifier", dict, "an object"),
                            ("purify", dict, "an object"), ("preset", str, "a name"),
                            ("ood_reference", dict, "an object"), ("dataset", str, "a name"),
                            ("name", str, "a name")):
        if key in card and card[key] is not None and not isinstance(card[key], kind):
            raise CheckpointError(f"{weights}: the card's {key!r} must be {what}, not {card[key]!r:.80}")


def checkpoint_path(name_or_path: str | Path) -> tuple[Path, bool]:
    """Where the weights of a model given by bundled name or by path are (not checked), and
    whether it was given by name.

    A path is a ``.safetensors`` or ``.json`` file name (the weights are beside the card) or
    anything with a folder separator in it (``runs/x`` means ``runs/x.safetensors``, and a run
    folder of ``rdc train`` its ``model.safetensors``); anything else is a bundled model's
    name, whatever files or folders the working directory holds.
    """
    text = str(name_or_path)
    p = Path(text)
    if p.suffix in (".safetensors", ".json"):
        return p.with_suffix(".safetensors"), False
    if os.sep in text or (os.altsep and os.altsep in text):
        if p.is_dir():
            return p / "model.safetensors", False
        return Path(text + ".safetensors"), False  # "cnn-v1.5" keeps its ".5"
    return BUNDLED_DIR / f"{text}.safetensors", True


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """Map a bundled model name or a path (see :func:`checkpoint_path`) to the weights file,
    checked to be a regular file."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    p = Path(name_or_path)
    if p.is_file() and p.suffix and p.suffix not in (".safetensors", ".json"):  # e.g. an image or a .pt file
        raise CheckpointError(f"{p}: not a checkpoint; give a .safetensors file with its .json card, a bundled "
                              f"model name, or an EDM snapshot (.pkl)")
    path, by_name = checkpoint_path(name_or_path)
    if not path.exists():
        if not by_name:
            raise CheckpointError(f"{path}: checkpoint file not found")
        names = ", ".join(list_bundled_models()) or "none"
        here = f"; for the {'folder' if p.is_dir() else 'file'} {p} here, give ./{p}" if p.exists() else ""
        raise CheckpointError(f"no bundled model named {str(name_or_path)!r} (bundled: {names}){here}")
    if not path.is_file():  # a folder, or a pipe or device (which would be read forever)
        raise CheckpointError(f"{path}: the checkpoint is not a regular file")
    return path


def _check_tensor_header(path: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Compare a safetensors file's tensor names, shapes and kinds (from its header alone)
    with a network's state dict (``expected``; meta tensors will do), before any weights or
    network are allocated: a small card cannot make the loader build a huge network."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = {}
            for key in f.keys():
                tensor = f.get_slice(key)
                dtype = tensor.get_dtype() if hasattr(tensor, "get_dtype") else None
                header[key] = (tuple(tensor.get_shape()), dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the config: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, ref in expected.items():
        shape, dtype = header[key]
        if shape != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}, config expects {tuple(ref.shape)}")
        # safetensors dtype names: F16, BF16, F32, F64 (and F8_*) are floating point
        if dtype is not None and dtype.startswith(("F", "BF")) != ref.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} is {dtype}, the network holds {ref.dtype}")


def load_checkpoint(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a bundled model by name or a checkpoint by path, validating every tensor.

    An EDM snapshot (``.pkl``) is converted in memory by the safe importer (:mod:`.edm_import`).
    """
    if str(name_or_path).lower().endswith(".pkl"):
        from .edm_import import load_edm_pickle

        return load_edm_pickle(name_or_path, device)
    path = resolve_model_path(name_or_path)
    card = _read_card(path)
    if isinstance(card["net"], dict) and card["net"].get("architecture") == "edm":
        from .edm_nets import build_edm_denoiser

        def build() -> torch.nn.Module:
            return build_edm_denoiser(card["net"])
    else:
        def build() -> torch.nn.Module:
            return build_denoiser(NetConfig.from_dict(card["net"]))
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated before the file is compared with the card
            described = build()
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: invalid network config ({exc})") from exc
    config = described.config
    if len(card["classes"]) != config.num_classes:
        raise CheckpointError(f"{path}: {len(card['classes'])} class names for {config.num_classes} classes")
    _check_tensor_header(path, described.state_dict())
    try:
        net = build()
    except (RuntimeError, MemoryError) as exc:  # the file holds the weights, yet they are too large for this machine
        raise CheckpointError(f"{path}: the network the card describes cannot be built here ({exc})") from exc
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    for key, ref in net.state_dict().items():  # names and shapes are checked; the values now
        if tensors[key].is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} is {tensors[key].dtype}, the network holds {ref.dtype}")
        if not torch.isfinite(tensors[key].float()).all():
            raise CheckpointError(f"{path}: tensor {key!r} contains NaN or inf")
    net.load_state_dict(tensors)
    net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    purifier = _load_purifier(path, card, config, device) if card.get("purifier") else None
    model = LoadedModel(net, card, path, purifier)
    _check_card_settings(model)
    return model


def _check_card_settings(model: LoadedModel) -> None:
    """The card's classifier, purification, preset and OOD entries make usable settings
    (else every job of the model would fail later, in the middle of a front end)."""
    from .classifier import classifier_settings
    from .defense import purify_settings
    from .ood import check_reference

    try:
        if model.classes:
            classifier_settings(model)
        purify_settings(model)
        if model.card.get("ood_reference") is not None:
            check_reference(model.card["ood_reference"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{model.path}: the card's settings are unusable ({exc})") from exc


def _load_purifier(path: Path, card: dict[str, Any], config: Any, device: str | torch.device) -> LoadedModel:
    """The purifier a card names (``{"path": relative to the card, "sha256": ...}``), checked:
    the file exists and has the recorded sha256, it names no purifier of its own, and it
    takes the same images as the classifier."""
    entry = card["purifier"]
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise CheckpointError(f"{path}: the card's 'purifier' entry must name a path, not {entry!r}")
    target = Path(os.path.normpath(path.parent / entry["path"])).with_suffix(".safetensors")
    if not target.exists():
        raise CheckpointError(f"{path}: its purifier {entry['path']} was not found (looked for {target})")
    if not target.is_file():  # e.g. a link to a device, whose sha256 would never finish
        raise CheckpointError(f"{path}: its purifier {target} is not a regular file")
    if target.resolve() == path.resolve():
        raise CheckpointError(f"{path}: the card names the model itself as its purifier")
    if _read_card(target).get("purifier"):  # checked before loading: a pair never nests, nor loops
        raise CheckpointError(f"{path}: its purifier {target.name} names a purifier of its own")
    if entry.get("sha256") and file_sha256(target) != entry["sha256"]:
        raise CheckpointError(f"{path}: its purifier {target.name} does not have the sha256 the card records "
                              "(replaced or modified since the pair was made)")
    purifier = load_checkpoint(target, device)
    p_cfg = purifier.net.config
    if (p_cfg.image_size, p_cfg.in_channels) != (config.image_size, config.in_channels):
        raise CheckpointError(f"{path}: its purifier {target.name} takes {p_cfg.in_channels}x{p_cfg.image_size}"
                              f"x{p_cfg.image_size} images, the classifier {config.in_channels}x{config.image_size}"
                              f"x{config.image_size}")
    return purifier


def list_model_names(folder: str | Path) -> list[str]:
    """The models in a folder, by stem: every ``*.safetensors`` except those that another
    card there names as its purifier (a classifier + purifier pair is one model)."""
    folder = Path(folder)
    if not folder.exists():
        return []
    stems = sorted(p.stem for p in folder.glob("*.safetensors"))
    purifiers = set()
    for side in folder.glob("*.json"):
        try:
            entry = read_json_object(side, "model card").get("purifier")
        except ValueError:
            continue
        rel = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(rel, str) and (folder / rel).resolve().parent == folder.resolve():
            purifiers.add(Path(rel).with_suffix("").name)
    return [stem for stem in stems if stem not in purifiers]


def is_cnn_card(weights: str | Path) -> bool:
    """Whether the card beside ``weights`` is a CNN baseline's (:mod:`core.baseline`)."""
    side = Path(weights).with_suffix(".json")
    try:
        return read_json_object(side, "model card").get("format") == CNN_FORMAT
    except ValueError:
        return False


def list_bundled_models(diffusion_only: bool = True) -> list[str]:
    """Names of the diffusion models shipped in ``resources/models`` (a pair counts once);
    ``diffusion_only=False`` adds the CNN baselines."""
    names = list_model_names(BUNDLED_DIR)
    if diffusion_only:
        names = [n for n in names if not is_cnn_card(BUNDLED_DIR / f"{n}.safetensors")]
    return names

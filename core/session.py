"""Session files: everything needed to re-run a classification, attack or purification exactly,
and the attack's verdict and the purification's steps themselves (exact float32 arrays)."""
from __future__ import annotations

import base64
import binascii
import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .models import (BUNDLED_DIR, CheckpointError, atomic_write_bytes, atomic_write_json, file_sha256,
                     list_bundled_models, read_json_object, resolve_model_path)

if TYPE_CHECKING:
    from .attacks import DefenseOutcome
    from .purify import PurifyStep

SESSION_FORMAT = "rdc-studio/session"
MAX_SESSION_BYTES = 256 * 2**20  # an image, settings and saved traces: far below this
MAX_TRACE_LENGTH = 1_000_000
"""The most iterations (an attack) or steps (a purification) a session's saved trace may hold."""


class SessionError(ValueError):
    """A session file cannot be used; the message names the file and the problem."""


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON (exact: raw bytes in base64)."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return {"shape": list(a.shape), "dtype": "float32", "data_b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    """An array written by :func:`encode_array`, bit for bit.

    Raises
    ------
    ValueError
        When ``obj`` is not such an array: another dtype, a shape that is not a list of
        whole numbers, data that is not base64 or not of the shape's size.
    """
    if obj.get("dtype") != "float32":
        raise ValueError("only float32 arrays are supported")
    shape = obj.get("shape")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"an array's shape must be a list of whole numbers, not {shape!r:.60}")
    data = base64.b64decode(obj["data_b64"])
    arr = np.frombuffer(data, dtype=np.float32).reshape(shape).copy()
    return arr


def save_session(path: str | Path, session: dict[str, Any]) -> None:
    """Write a session dictionary (see :func:`make_session`) atomically."""
    atomic_write_json(path, session)


def make_session(model: str, image: np.ndarray, image_source: str, classifier: dict, attack: dict,
                 purify: dict, results: dict, device: str = "cpu", known_class: int | None = None,
                 model_sha256: str | None = None) -> dict[str, Any]:
    """Assemble a session: model (see :func:`session_model_reference`) and the sha256 of its
    weights file, exact input image (with its label ``known_class`` when known), all
    settings (with seeds) and results."""
    session = {"format": SESSION_FORMAT, "version": 1, "model": model, "device": device,
               "image": dict(encode_array(image), source=image_source, known_class=known_class),
               "classifier": classifier, "attack": attack, "purify": purify, "results": results}
    if model_sha256:
        session["model_sha256"] = model_sha256
    return session


def session_model_reference(path: str | Path) -> str:
    """How a session names the model of weights file ``path``: a bundled model by its name
    (any installation resolves it), any other by its path."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.parent.resolve() == BUNDLED_DIR.resolve() \
            and path.stem in list_bundled_models():
        return path.stem
    return str(path)


def _weights_file(reference: str) -> Path:
    """The file whose sha256 a session records for ``reference`` (an EDM snapshot is its own)."""
    return Path(reference) if reference.lower().endswith(".pkl") else resolve_model_path(reference)


def session_model(session: dict[str, Any], check_sha256: bool = True) -> tuple[str, str]:
    """The model to load for a loaded session (a name or path for ``load_checkpoint``), and a
    warning for the user ("" when none).

    A bundled model is named by name (resolved in this installation). A path that is gone
    but lay in a bundled models folder (``resources/models``: sessions saved before names
    were recorded, or by another installation) resolves by name to this installation's
    bundled model of that name. The warning says when the weights found are not those the
    session recorded (their sha256, read unless ``check_sha256`` is False), or cannot be compared.
    """
    recorded = session["model"]
    reference, warning = recorded, ""
    path = Path(recorded)
    if path.suffix == ".safetensors" and not path.exists() and path.parent.name == "models" \
            and path.parent.parent.name == "resources" and path.stem in list_bundled_models():
        reference = path.stem
        warning = f"The session's model file {recorded} is not here: this installation's bundled {path.stem} is used"
    sha = session.get("model_sha256") if check_sha256 else None
    try:
        weights = _weights_file(reference)
        differs = bool(sha) and weights.is_file() and file_sha256(weights) != sha
    except (CheckpointError, OSError):
        return reference, warning  # loading it says why it cannot be used
    if differs:
        warning = (f"{warning}. " if warning else "") + (
            f"The weights of {reference} are not those the session was saved with (another sha256): "
            "its results may not be reproduced")
    elif sha:
        warning = ""  # the very weights, wherever they are
    elif warning and check_sha256:
        warning += " (the session records no sha256 of its weights to compare)"
    return reference, warning


def load_session(path: str | Path) -> dict[str, Any]:
    """Read and validate a session file."""
    path = Path(path)
    session = read_json_object(path, "session file", SessionError, MAX_SESSION_BYTES)
    if session.get("format") != SESSION_FORMAT:
        raise SessionError(f"{path}: not an RDC Studio session file")
    for key in ("model", "image", "classifier"):
        if key not in session:
            raise SessionError(f"{path}: session lacks {key!r}")
    for key, kind, what in (("model", str, "a model name or path"), ("image", dict, "an object"),
                            ("classifier", dict, "an object"), ("attack", dict, "an object"),
                            ("purify", dict, "an object"), ("results", dict, "an object"),
                            ("attack_gradient", str, "a name"), ("device", str, "a name"),
                            ("model_sha256", str, "a hex digest")):
        if session.get(key) is not None and not isinstance(session[key], kind):
            raise SessionError(f"{path}: the session's {key!r} must be {what}, not {session[key]!r:.60}")
    binarize = session.get("attack_binarize")
    if binarize is not None and (isinstance(binarize, bool) or not isinstance(binarize, (int, float))):
        raise SessionError(f"{path}: the session's 'attack_binarize' must be a number, not {binarize!r:.60}")
    try:
        image = decode_array(session["image"])
    except (KeyError, ValueError, TypeError, AttributeError, binascii.Error) as exc:
        raise SessionError(f"{path}: invalid image in session ({exc})") from exc
    if image.ndim != 3 or image.size == 0 or not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise SessionError(f"{path}: the session's image must be a non-empty (channels, height, width) array with "
                           f"values in [0, 1]")
    session["image_array"] = image
    return session


def write_csv(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    """Write a CSV file atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def session_settings(session: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """A loaded session's classifier, attack and purification settings, validated (as
    dictionaries of the settings classes' fields; None where the session has none). Keys
    that another version of the app wrote are left out.

    Raises
    ------
    SessionError
        When a setting has the wrong type or an unusable value.
    """
    from .attacks import AttackSettings
    from .classifier import ClassifierSettings
    from .purify import PurifySettings

    def known(entry: dict[str, Any] | None, cls: type) -> dict[str, Any] | None:
        return None if entry is None else {k: v for k, v in entry.items() if k in cls.__dataclass_fields__}

    try:
        classifier = known(session["classifier"], ClassifierSettings)
        if not isinstance(classifier.get("preset", ""), str):
            raise ValueError(f"preset must be a name, not {classifier['preset']!r:.60}")
        ClassifierSettings.from_dict(classifier)
        attack = known(session.get("attack"), AttackSettings)
        purify = known(session.get("purify"), PurifySettings)
        return (classifier, None if attack is None else AttackSettings(**attack).to_dict(),
                None if purify is None else PurifySettings(**purify).to_dict())
    except (TypeError, ValueError) as exc:
        raise SessionError(f"the session's settings are unusable ({exc})") from exc


# -- saved traces: an attack's verdict and a purification's steps ---------------------------------------------
def checked_array(obj: Any, what: str, shape: tuple[int, ...], lo: float | None = None,
                  hi: float | None = None, finite: bool = True) -> np.ndarray:
    """Decode ``obj`` (:func:`encode_array`'s form) and check its shape, that it is finite
    (unless ``finite`` is False: curves a run drew, whatever they held, reopen as they were
    drawn) and within [``lo``, ``hi``] (no bound where None).

    Raises
    ------
    SessionError
        Naming ``what`` and the problem.
    """
    if not isinstance(obj, dict):
        raise SessionError(f"{what} must be an array object, not {obj!r:.60}")
    try:
        arr = decode_array(obj)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # binascii.Error is a ValueError
        raise SessionError(f"{what} is not a valid array ({exc})") from None
    if arr.shape != shape:
        raise SessionError(f"{what} has shape {arr.shape}, not {shape}")
    if finite and not np.isfinite(arr).all():
        raise SessionError(f"{what} holds values that are not finite")
    if (lo is not None and arr.size and np.nanmin(arr) < lo) or (hi is not None and arr.size and np.nanmax(arr) > hi):
        raise SessionError(f"{what} must lie in [{'-inf' if lo is None else f'{lo:g}'}, "
                           f"{'inf' if hi is None else f'{hi:g}'}]")
    return arr


def checked_whole_numbers(value: Any, what: str, length: int | None = None, lo: int = 0,
                          hi: int | None = None) -> list[int]:
    """``value`` as a list of whole numbers in ``lo``..``hi`` (of ``length`` when given).

    Raises
    ------
    SessionError
        Naming ``what`` and the problem.
    """
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise SessionError(f"{what} must be a list of {length if length is not None else 'some'} whole numbers, "
                           f"not {value!r:.60}")
    if len(value) > MAX_TRACE_LENGTH:
        raise SessionError(f"{what} holds {len(value):,} entries, more than the {MAX_TRACE_LENGTH:,} allowed")
    if not all(type(v) is int and v >= lo and (hi is None or v <= hi) for v in value):
        bounds = f"of at least {lo}" if hi is None else f"in {lo}-{hi}"
        raise SessionError(f"{what} must hold whole numbers {bounds}, not {value!r:.60}")
    return value


def checked_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a JSON object, else a :class:`SessionError` naming ``what``."""
    if not isinstance(value, dict):
        raise SessionError(f"{what} must be an object, not {value!r:.60}")
    return value


def checked_flags(value: Any, what: str, length: int) -> list[bool]:
    """``value`` as a list of ``length`` booleans, else a :class:`SessionError` naming ``what``."""
    if not isinstance(value, list) or len(value) != length or not all(isinstance(v, bool) for v in value):
        raise SessionError(f"{what} must be a list of {length} true/false values, not {value!r:.60}")
    return value


def encode_outcome(outcome: DefenseOutcome) -> dict[str, Any]:
    """A defense's verdict on an attack (:class:`~rdc_studio.core.attacks.DefenseOutcome`, and
    its ``clean_correct`` field when it has one) as JSON: float arrays exact, labels and
    predictions as whole numbers, flags as booleans."""
    clean_correct = getattr(outcome, "clean_correct", None)
    return ({name: None if getattr(outcome, name) is None else encode_array(getattr(outcome, name))
             for name in ("clean", "adversarial", "purified", "defense_probabilities", "linf", "l2")}
            | {name: [int(v) for v in getattr(outcome, name)] for name in ("labels", "attacked_prediction")}
            | {name: [bool(v) for v in getattr(outcome, name)] for name in ("attack_succeeded", "defense_recovered")}
            | {"clean_correct": None if clean_correct is None else [bool(v) for v in clean_correct]})


def decode_outcome(obj: Any, num_classes: int, image_shape: tuple[int, int, int],
                   cls: type | None = None) -> DefenseOutcome:
    """The verdict :func:`encode_outcome` wrote, checked for one attacked image of
    ``image_shape`` (C, H, W) and a model of ``num_classes`` classes.

    Parameters
    ----------
    cls
        The class to build (default :class:`~rdc_studio.core.attacks.DefenseOutcome`); a
        saved ``clean_correct`` is passed only to a class with that field.

    Raises
    ------
    SessionError
        When a field is missing, of the wrong type or shape, not finite, out of range (images
        outside [0, 1], a class index beyond the model's), or the flags contradict the
        predictions.
    """
    from .attacks import DefenseOutcome

    cls = cls or DefenseOutcome
    checked_object(obj, "the attack's verdict")
    for name in ("clean", "adversarial", "defense_probabilities", "linf", "l2", "labels", "attacked_prediction",
                 "attack_succeeded", "defense_recovered"):
        if name not in obj:
            raise SessionError(f"the attack's verdict lacks {name!r}")
    image = (1, *image_shape)
    fields = {name: checked_array(obj[name], f"the attack's {name} image", image, 0.0, 1.0)
              for name in ("clean", "adversarial")}
    purified = obj.get("purified")
    fields["purified"] = None if purified is None else checked_array(purified, "the attack's purified image",
                                                                    image, 0.0, 1.0)
    probs = checked_array(obj["defense_probabilities"], "the defense's probabilities", (1, num_classes), 0.0, 1.0)
    if abs(float(probs.sum(dtype=np.float64)) - 1) > 1e-3:
        raise SessionError("the defense's probabilities do not sum to 1")
    fields["defense_probabilities"] = probs
    for name in ("linf", "l2"):
        fields[name] = checked_array(obj[name], f"the attack's {name} distance", (1,), 0.0)
    for name in ("labels", "attacked_prediction"):
        fields[name] = np.array(checked_whole_numbers(obj[name], f"the attack's {name}", 1, 0, num_classes - 1),
                                np.int64)
    for name in ("attack_succeeded", "defense_recovered"):
        fields[name] = np.array(checked_flags(obj[name], f"the attack's {name}", 1), bool)
    if bool(fields["attack_succeeded"][0]) != bool(fields["attacked_prediction"][0] != fields["labels"][0]):
        raise SessionError("the attack's attack_succeeded contradicts its label and prediction")
    if bool(fields["defense_recovered"][0]) != bool(int(np.argmax(probs[0])) == fields["labels"][0]):
        raise SessionError("the attack's defense_recovered contradicts its label and the defense's probabilities")
    clean_correct = obj.get("clean_correct")
    if clean_correct is not None and "clean_correct" in getattr(cls, "__dataclass_fields__", {}):
        fields["clean_correct"] = np.array(checked_flags(clean_correct, "the attack's clean_correct", 1), bool)
    return cls(**fields)


def encode_purify_steps(records: list[PurifyStep]) -> dict[str, Any]:
    """A purification's step records (:class:`~rdc_studio.core.purify.PurifyStep`, of one
    image, with logits and objective estimates) as JSON: each field of every step stacked
    into one exact float32 array, the step numbers as whole numbers.

    Raises
    ------
    ValueError
        When a record lacks its logits or objective estimate.
    """
    if any(r.logits is None or r.objective_estimate is None for r in records):
        raise ValueError("every step needs its logits and objective estimate")

    def stacked(name: str) -> dict[str, Any]:
        return encode_array(np.stack([np.asarray(getattr(r, name), np.float32) for r in records]))

    return {"step": [int(r.step) for r in records], "total_steps": [int(r.total_steps) for r in records],
            "sigma": encode_array(np.array([r.sigma for r in records], np.float32)),
            **{name: stacked(name) for name in ("image", "objective", "linf", "l2", "logits", "objective_estimate")}}


def decode_purify_steps(obj: Any, num_classes: int, image_shape: tuple[int, int, int]) -> list[PurifyStep]:
    """The step records :func:`encode_purify_steps` wrote, checked for one image of
    ``image_shape`` (C, H, W) and a model of ``num_classes`` classes.

    Raises
    ------
    SessionError
        When a field is missing, of the wrong type or shape, not finite or out of range, or
        the steps are not increasing within their total.
    """
    from .purify import PurifyStep

    checked_object(obj, "the purification's steps")
    for name in ("step", "total_steps", "sigma", "image", "objective", "linf", "l2", "logits", "objective_estimate"):
        if name not in obj:
            raise SessionError(f"the purification's steps lack {name!r}")
    steps = checked_whole_numbers(obj["step"], "the purification's step numbers")
    n = len(steps)
    if n == 0:
        raise SessionError("the purification holds no step")
    totals = checked_whole_numbers(obj["total_steps"], "the purification's total steps", n)
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(s > t for s, t in zip(steps, totals)) \
            or len(set(totals)) != 1:
        raise SessionError("the purification's step numbers must increase, within one total number of steps")
    what = "the purification's"
    image = checked_array(obj["image"], f"{what} images", (n, 1, *image_shape), 0.0, 1.0)
    sigma = checked_array(obj["sigma"], f"{what} noise levels", (n,), 0.0)
    objective = checked_array(obj["objective"], f"{what} objective", (n, 1), finite=False)
    estimate = checked_array(obj["objective_estimate"], f"{what} objective estimate", (n, 1), finite=False)
    linf = checked_array(obj["linf"], f"{what} l-inf distances", (n, 1), 0.0)
    l2 = checked_array(obj["l2"], f"{what} l2 distances", (n, 1), 0.0)
    logits = checked_array(obj["logits"], f"{what} logits", (n, 1, num_classes), finite=False)
    return [PurifyStep(steps[i], totals[i], image[i], objective[i], float(sigma[i]), linf[i], l2[i], logits[i],
                       estimate[i]) for i in range(n)]

"""Session files: everything needed to re-run a classification, attack or purification exactly."""
from __future__ import annotations

import base64
import binascii
import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from .models import (BUNDLED_DIR, CheckpointError, atomic_write_bytes, atomic_write_json, file_sha256,
                     list_bundled_models, read_json_object, resolve_model_path)

SESSION_FORMAT = "rdc-studio/session"
MAX_SESSION_BYTES = 256 * 2**20  # one image and settings: far below this


class SessionError(ValueError):
    """A session file cannot be used; the message names the file and the problem."""


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """A float32 array as JSON (exact: raw bytes in base64)."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return {"shape": list(a.shape), "dtype": "float32", "data_b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    if obj.get("dtype") != "float32":
        raise ValueError("only float32 arrays are supported")
    data = base64.b64decode(obj["data_b64"])
    arr = np.frombuffer(data, dtype=np.float32).reshape(obj["shape"]).copy()
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
    if image.ndim != 3 or not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        raise SessionError(f"{path}: the session's image must be (channels, height, width) with values in [0, 1]")
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


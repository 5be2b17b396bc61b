"""Session files: everything needed to re-run a classification, attack or purification exactly."""
from __future__ import annotations

import base64
import binascii
import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from .models import atomic_write_bytes, atomic_write_json, read_json_object

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
                 purify: dict, results: dict, device: str = "cpu", known_class: int | None = None) -> dict[str, Any]:
    """Assemble a session: model, exact input image (with its label ``known_class`` when
    known), all settings (with seeds) and results."""
    return {"format": SESSION_FORMAT, "version": 1, "model": model, "device": device,
            "image": dict(encode_array(image), source=image_source, known_class=known_class), "classifier": classifier,
            "attack": attack, "purify": purify, "results": results}


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
                            ("attack_gradient", str, "a name"), ("device", str, "a name")):
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


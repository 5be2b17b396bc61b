"""Session files: everything needed to re-run a classification, attack or purification exactly."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .models import atomic_write_bytes, atomic_write_json

SESSION_FORMAT = "rdc-studio/session"


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
    try:
        session = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SessionError(f"{path}: cannot read session ({exc})") from exc
    if not isinstance(session, dict) or session.get("format") != SESSION_FORMAT:
        raise SessionError(f"{path}: not an RDC Studio session file")
    for key in ("model", "image", "classifier"):
        if key not in session:
            raise SessionError(f"{path}: session lacks {key!r}")
    try:
        session["image_array"] = decode_array(session["image"])
    except (KeyError, ValueError, TypeError) as exc:
        raise SessionError(f"{path}: invalid image in session ({exc})") from exc
    return session


def write_csv(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    """Write a CSV file atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())

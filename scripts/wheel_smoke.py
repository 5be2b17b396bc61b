"""Smoke test of an installed RDC Studio (run by .ci/run from outside the source tree).

Checks what a new user meets after ``pip install rdc_studio-*.whl``: the distribution's
only top-level import name is ``rdc_studio``, ``rdc classify`` works on a bundled sample,
``rdc eval`` runs with ``RDC_DATA_ROOT`` and fails in one line without data, and
``rdc-studio --screenshot`` writes a window with the sample gallery filled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def run(args: list[str], env: dict[str, str] | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    if expect_ok and proc.returncode != 0:
        raise SystemExit(f"FAILED ({proc.returncode}): {' '.join(args)}\n{proc.stdout}\n{proc.stderr}")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", required=True, help="the data root holding MNIST/raw")
    args = parser.parse_args()
    here = Path.cwd()
    import rdc_studio.core.models as models

    package_file = Path(models.__file__).resolve()
    if "site-packages" not in package_file.parts:
        raise SystemExit(f"rdc_studio is imported from {package_file}, not from the installed wheel")
    dist = metadata.distribution("rdc-studio")
    top_level = {Path(str(f)).parts[0] for f in dist.files if str(f).endswith(".py")}
    if top_level != {"rdc_studio"}:
        raise SystemExit(f"the wheel installs top-level names {sorted(top_level)}; expected only rdc_studio")
    samples = sorted(models.resource_dir("samples").glob("*.png"))
    if not samples or not models.list_bundled_models():
        raise SystemExit("the wheel ships no samples or no bundled models")

    out = run(["rdc", "classify", str(samples[0]), "--json", "--threads", "2"])
    result = json.loads(out.stdout)
    print("rdc classify:", out.stdout.strip().splitlines()[0][:200])
    if not result:
        raise SystemExit("rdc classify printed nothing")

    env = dict(os.environ, RDC_DATA_ROOT=args.shared_data)
    out = run(["rdc", "eval", "--dataset", "mnist", "--n", "20", "--defense", "dc", "--attack", "none",
               "--threads", "2", "--out", str(here / "eval.json")], env=env)
    report = json.loads((here / "eval.json").read_text())
    print("rdc eval: clean accuracy", report.get("clean_acc"), "on", report.get("n"))

    env = {k: v for k, v in os.environ.items() if k != "RDC_DATA_ROOT"}
    out = run(["rdc", "eval", "--dataset", "mnist", "--n", "2"], env=env, expect_ok=False)
    message = out.stderr.strip()
    if out.returncode == 0 or "Traceback" in message or len(message.splitlines()) != 1:
        raise SystemExit(f"a missing data root must be a one-line error, got ({out.returncode}):\n{message}")
    print("missing data:", message)

    shot = here / "window.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    run(["rdc-studio", "--screenshot", str(shot)], env=env)
    if not shot.exists() or shot.stat().st_size < 10_000:
        raise SystemExit("rdc-studio --screenshot wrote no window image")
    print("rdc-studio: screenshot", shot.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

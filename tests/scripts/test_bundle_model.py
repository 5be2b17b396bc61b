"""scripts/bundle_model.py --card-only rewrites a bundled model's card and never its weights."""
import importlib.util
import json
from pathlib import Path

import pytest

from rdc_studio.core.models import file_sha256, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bundle(tmp_path, tiny_checkpoint, monkeypatch):
    spec = importlib.util.spec_from_file_location("bundle_model", ROOT / "scripts" / "bundle_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "bundled"
    folder.mkdir()
    weights = folder / "tiny.safetensors"
    weights.write_bytes(tiny_checkpoint.read_bytes())
    reference = {"settings": {"levels": 4}, "probabilities": [0.0, 1.0], "quantiles": [1.0, 2.0], "kept": True}
    card = load_checkpoint(tiny_checkpoint).card | {"metrics": {"val": {"n": 5}}, "ood_reference": reference}
    (folder / "tiny.json").write_text(json.dumps(card))
    monkeypatch.setattr(module, "BUNDLED_DIR", folder)
    return module, weights


def test_card_only_updates_purification_and_keeps_weights_and_other_fields(bundle, tmp_path):
    module, weights = bundle
    sha = file_sha256(weights)
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"chosen": "eta 0.1"}))
    argv = ["--card-only", "--name", "tiny", "--purify-eta", "0.1", "--purify-step-size", "0.04",
            "--purify-sigma", "0.4,0.6", "--purify-note", "chosen on val", "--purify-sweep", str(sweep)]
    assert module.main(argv) == 0
    assert module.main(argv) == 0  # idempotent but for the record of the commands
    assert file_sha256(weights) == sha
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["purify"]["eta"] == pytest.approx(0.1) and card["purify"]["step_size"] == pytest.approx(0.04)
    assert (card["purify"]["sigma_lo"], card["purify"]["sigma_hi"]) == (0.4, 0.6)
    assert card["metrics"]["purify_choice"] == "chosen on val"
    assert card["metrics"]["purify_sweep"] == {"chosen": "eta 0.1"}
    assert card["metrics"]["val"] == {"n": 5} and card["ood_reference"]["kept"] is True
    updates = card["metrics"]["card_updates"]
    assert len(updates) == 2 and updates[0].startswith("python scripts/bundle_model.py --card-only --name tiny")
    assert load_checkpoint(weights).card["purify"] == card["purify"]  # what the defense reads


def test_card_only_refuses_an_unknown_model_or_nothing_to_do(bundle, capsys):
    module, weights = bundle
    before = weights.with_suffix(".json").read_text()
    with pytest.raises(SystemExit):
        module.main(["--card-only", "--name", "missing", "--purify-eta", "0.1"])
    assert "no bundled model 'missing'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--card-only", "--name", "tiny"])
    assert "nothing to update" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--name", "tiny", "--steps", "4"])  # a full bundle needs the run and the sigma range
    assert "--run, --sigma-min, --sigma-max" in capsys.readouterr().err
    assert weights.with_suffix(".json").read_text() == before


def test_purification_options_not_given_keep_the_defaults(bundle):
    """Before, ``--purify-eta`` alone wrote a step size of 0 (a purification that does
    nothing), and ``--purify-steps 0`` became 5."""
    from rdc_studio.core.purify import PurifySettings

    module, weights = bundle
    assert module.main(["--card-only", "--name", "tiny", "--purify-eta", "0.1"]) == 0
    card = json.loads(weights.with_suffix(".json").read_text())
    defaults = PurifySettings()
    assert card["purify"]["step_size"] == pytest.approx(defaults.step_size) and defaults.step_size > 0
    assert card["purify"]["steps"] == defaults.steps
    assert module.main(["--card-only", "--name", "tiny", "--purify-eta", "0.1", "--purify-steps", "0"]) == 0
    assert json.loads(weights.with_suffix(".json").read_text())["purify"]["steps"] == 0

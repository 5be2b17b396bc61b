"""EDM snapshot import: safety of the unpickler, the networks against EDM's own forward
passes, the published CIFAR-10 configurations key for key, and the checkpoint round trip.

The fixtures (``../shared/fixtures/edm``) are small EDM networks with random weights,
pickled as EDM's training loop does, with reference outputs computed by EDM's code.
"""
from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rdc_studio.core.edm_import import (CIFAR10_CLASSES, EdmImportError, ModuleRecord, PersistentRecord, convert,
                                        import_edm, output_path, read_snapshot)
from rdc_studio.core.edm_nets import EdmDenoiser, EdmNetConfig, published_config
from rdc_studio.core.models import CheckpointError, load_checkpoint

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "edm"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures/edm")
INDEX = json.loads((FIXTURES / "index.json").read_text()) if (FIXTURES / "index.json").exists() else None
pytestmark = pytest.mark.skipif(INDEX is None, reason="EDM fixtures (../shared/fixtures/edm) not present")
FIXTURE_NAMES = sorted(INDEX["fixtures"]) if INDEX else []
PUBLISHED = sorted(INDEX["published_configs"]) if INDEX else []


@pytest.fixture(scope="module")
def converted() -> dict:
    """Every fixture converted once (network, card)."""
    return {name: convert(FIXTURES / INDEX["fixtures"][name]["pickle"]) for name in FIXTURE_NAMES}


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Per example, max |out - ref| <= 1e-5 of that example's output scale (max |ref|)."""
    err = (out - ref).flatten(1).abs().amax(1)
    scale = ref.flatten(1).abs().amax(1)
    assert bool((err <= 1e-5 * scale).all()), f"relative errors {(err / scale).tolist()}"


# -- the networks against EDM's own forward passes ---------------------------------------

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_forward_matches_edm(name: str, converted: dict) -> None:
    net, card = converted[name]
    info = INDEX["fixtures"][name]
    io = load_file(str(FIXTURES / info["io"]))
    assert net.config.num_classes == info["label_dim"]
    assert sum(p.numel() for p in net.parameters()) == info["parameters"]
    assert len(net.state_dict()) == info["state_dict_keys"]
    labels = io.get("class_labels")
    with torch.no_grad():
        out = net(io["x"], io["sigma"], labels)
        assert out.dtype == torch.float32
        _assert_close(out, io["D_x"])
        if "D_x_augment" in io:
            _assert_close(net(io["x"], io["sigma"], labels, augment_labels=io["augment_labels"]), io["D_x_augment"])
    # the project's interface gives the same numbers: denoise_labels with the integer labels
    if labels is not None:
        with torch.no_grad():
            d = net.denoise_labels(io["x"], io["sigma"], labels.argmax(1))
        _assert_close(d, io["D_x"])


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_card_records_source_and_config(name: str, converted: dict) -> None:
    net, card = converted[name]
    info = INDEX["fixtures"][name]
    path = FIXTURES / info["pickle"]
    import hashlib

    assert card["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["source"]["file"] == path.name
    assert card["source"]["precond_class"] == info["precond"]
    assert card["source"]["model_class"] == info["network_kwargs"]["model_type"]
    for key, value in info["network_kwargs"].items():
        if key != "model_type":
            assert card["network"][key] == value, key
    assert card["preconditioning"]["class"] == info["precond"]
    assert net.sigma_min == pytest.approx(float(info["sigma_min"]))
    assert net.sigma_max == pytest.approx(float(info["sigma_max"]))
    assert len(card["classes"]) == info["label_dim"]


def test_heads_batched_match_one_at_a_time(converted: dict) -> None:
    """All K classes (and the unconditional head) as one batched pass equal K separate passes."""
    net, _ = converted["vp-ddpmpp-cond"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    sigma = torch.tensor([0.1, 1.0, 5.0])
    with torch.no_grad():
        all_heads = net.denoise(x, sigma)
        assert all_heads.shape == (3, 11, 3, 16, 16)
        for y in range(11):
            one = net.denoise_labels(x, sigma, torch.full((3,), y))
            torch.testing.assert_close(all_heads[:, y], one, rtol=1e-5, atol=1e-5)
        # head K is EDM's label-less call (the all-zero label)
        torch.testing.assert_close(all_heads[:, 10], net(x, sigma), rtol=1e-5, atol=1e-5)


def test_unconditional_network_heads(converted: dict) -> None:
    net, card = converted["vp-ddpmpp-uncond"]
    assert net.config.num_classes == 0 and card["classes"] == []
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        d = net.denoise(x, sigma, heads=[0])
        torch.testing.assert_close(d[:, 0], net(x, sigma))
    with pytest.raises(ValueError, match="unconditional"):
        net.denoise(x, sigma, heads=[])


# -- the published CIFAR-10 configurations ------------------------------------------------

@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configuration_matches_key_for_key(name: str) -> None:
    ref = INDEX["published_configs"][name]
    config = published_config(name)
    assert config.precond == {"VPPrecond": "vp", "VEPrecond": "ve"}[ref["precond"]]
    assert config.num_classes == ref["label_dim"]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        net = EdmDenoiser(config)
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(shapes) == list(ref["state_dict"])  # same keys, same order
    assert shapes == ref["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == ref["parameters"]


def test_conditional_vp_parameter_count() -> None:
    with torch.device("meta"):
        net = EdmDenoiser(published_config("cifar10-32x32-cond-vp.pkl"))
    assert sum(p.numel() for p in net.parameters()) == 55_735_299


def test_config_rejects_unknown_arguments() -> None:
    with pytest.raises(ValueError, match="unknown SongUNet arguments"):
        EdmNetConfig(model_kwargs={"model_channels": 16, "bogus": 1})
    with pytest.raises(ValueError, match="precond"):
        EdmNetConfig(precond="iddpm")
    with pytest.raises(ValueError, match="unknown EDM network config keys"):
        EdmNetConfig.from_dict({"architecture": "edm", "channels": [1]})


# -- the checkpoint round trip and loading a .pkl directly ---------------------------------

@pytest.mark.parametrize("name", ["vp-ddpmpp-cond", "ve-ncsnpp-cond", "edm-adm-cond"])
def test_round_trip_through_checkpoint_format(name: str, converted: dict, tmp_path: Path) -> None:
    src = FIXTURES / INDEX["fixtures"][name]["pickle"]
    path = import_edm(src, tmp_path / "imported", command="rdc import-edm test")
    assert path == tmp_path / "imported.safetensors" and path.exists()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["format"] == "rdc-studio/diffusion-classifier"
    assert card["net"]["architecture"] == "edm"
    assert card["source"]["sha256"] == converted[name][1]["source"]["sha256"]
    assert card["import_command"] == "rdc import-edm test"
    loaded = load_checkpoint(path)
    assert type(loaded.net).__name__ == "EdmDenoiser"
    assert loaded.net.config.to_dict() == converted[name][0].config.to_dict()
    io = load_file(str(FIXTURES / INDEX["fixtures"][name]["io"]))
    with torch.no_grad():
        _assert_close(loaded.net(io["x"], io["sigma"], io.get("class_labels")), io["D_x"])
    assert all(not p.requires_grad for p in loaded.net.parameters())


def test_load_checkpoint_accepts_pkl() -> None:
    model = load_checkpoint(str(FIXTURES / "vp-ddpmpp-cond.pkl"))
    assert model.path.suffix == ".pkl"
    assert model.net.config.architecture == "edm" and model.classes == [str(i) for i in range(10)]
    assert model.card["net"]["precond"] == "vp"


def test_output_path(tmp_path: Path) -> None:
    assert output_path("a/b/snap.pkl", tmp_path) == tmp_path / "snap.safetensors"
    assert output_path("snap.pkl", str(tmp_path / "new") + os.sep) == tmp_path / "new" / "snap.safetensors"
    assert output_path("snap.pkl", tmp_path / "cifar-cond") == tmp_path / "cifar-cond.safetensors"
    assert output_path("snap.pkl", tmp_path / "m.v2") == tmp_path / "m.v2.safetensors"
    assert output_path("snap.pkl", tmp_path / "m.json") == tmp_path / "m.safetensors"


def test_cifar10_class_names_for_a_cifar10_snapshot(tmp_path: Path) -> None:
    """A 32x32 RGB 10-class snapshot trained on cifar10 gets the CIFAR-10 class names."""
    from rdc_studio.core.edm_import import _guess_dataset

    config = published_config("cifar10-32x32-cond-vp")
    assert _guess_dataset(config, {"dataset_kwargs": {"path": "datasets/cifar10-32x32.zip"}},
                          Path("network-snapshot-200000.pkl")) == "cifar10"
    assert _guess_dataset(config, {}, Path("edm-cifar10-32x32-cond-vp.pkl")) == "cifar10"
    assert _guess_dataset(config, {}, Path("snapshot.pkl")) is None
    assert len(CIFAR10_CLASSES) == 10 and CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[-1] == "truck"


# -- the engine uses an imported network unchanged -----------------------------------------

def test_classifier_purifier_and_sampler_run_on_an_imported_network(converted: dict) -> None:
    from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier
    from rdc_studio.core.purify import LikelihoodMaximizer, PurifySettings
    from rdc_studio.core.sample import sample

    net, _ = converted["vp-ddpmpp-cond"]
    clf = DiffusionClassifier(net, ClassifierSettings(steps=3, sigma_min=0.05, sigma_max=2.0))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    logits = clf(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # progressive elimination goes through denoise_labels
    clf2 = DiffusionClassifier(net, ClassifierSettings(steps=4, sigma_min=0.05, sigma_max=2.0,
                                                       screen_levels=2, keep_classes=3))
    assert clf2(x.detach()).shape == (2, 10)

    uncond, _ = converted["vp-ddpmpp-uncond"]
    lm = LikelihoodMaximizer(uncond, PurifySettings(steps=2))
    purified = lm(x.detach())
    assert purified.shape == x.shape and (purified - x.detach()).abs().max() <= 8 / 255 + 1e-6

    last = None
    for last in sample(net, 3, n=1, steps=3):
        pass
    assert last is not None and last.image.shape == (1, 3, 16, 16)


def test_a_class_conditional_edm_network_counts_k_inputs_per_row_and_splits_by_class(converted: dict) -> None:
    """EDM's every-class pass is K network inputs per (image, level): the calls respect the
    input limit, down to one input each when a row's K classes do not fit, and the logits
    and gradients are those of the unsplit pass."""
    from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier

    net, _ = converted["edm-ddpmpp-cond"]
    calls: list[int] = []
    original = net._precondition

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    net._precondition = counted
    try:
        results = {}
        for limit in (10_000, 20, 3):
            calls.clear()
            clf = DiffusionClassifier(net, ClassifierSettings(steps=3, sigma_min=0.05, sigma_max=2.0, noise_seed=1),
                                      max_network_inputs=limit)
            x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
            logits = clf(x)
            (grad,) = torch.autograd.grad(logits.logsumexp(1).sum() - logits[:, 2].sum(), x)
            results[limit] = logits.detach(), grad
            assert max(calls) <= limit and sum(calls) >= 2 * 3 * 10  # 2 images x 3 levels x 10 classes
    finally:
        del net._precondition
    for limit in (20, 3):
        assert torch.allclose(results[limit][0], results[10_000][0], rtol=1e-5, atol=1e-4)
        scale = float(results[10_000][1].abs().max())
        assert torch.allclose(results[limit][1], results[10_000][1], rtol=1e-3, atol=1e-3 * scale)


def test_a_costly_network_gets_proportionally_smaller_calls(converted: dict, monkeypatch) -> None:
    """The device limits are for the shipped network's cost per input; a network c times as
    costly (counted in multiply-adds, as torch's FLOP counter counts them) gets 1/c of each."""
    from torch.utils.flop_counter import FlopCounterMode

    import rdc_studio.core.classifier as classifier_module
    from rdc_studio.core.classifier import ClassifierSettings, DiffusionClassifier, count_macs_per_input

    net, _ = converted["edm-ddpmpp-cond"]
    x = torch.zeros(1, 3, 16, 16)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        net.denoise_labels(x, torch.ones(1), torch.zeros(1, dtype=torch.long))
    macs = count_macs_per_input(net)
    assert macs == flops.get_total_flops() // 2 and macs > 0
    clf = DiffusionClassifier(net, ClassifierSettings(steps=2))
    cheap = (clf.network_input_limit(), clf.network_input_limit(True), clf.activation_limit())
    assert cheap == (160, 64, 512)  # cheaper than the reference: the limits as they are
    monkeypatch.setattr(classifier_module, "REFERENCE_MACS_PER_INPUT", macs / 10)  # now 10 times as costly
    assert (clf.network_input_limit(), clf.network_input_limit(True), clf.activation_limit()) == (16, 6, 51)
    # on CUDA only the limits under autograd (memory) scale; a no-grad call keeps its throughput
    limit = classifier_module.network_call_limit
    assert (limit(net, "cuda"), limit(net, "cuda", gradients=True)) == (4096, 409)
    monkeypatch.setattr(classifier_module, "REFERENCE_MACS_PER_INPUT", macs / 1000)
    assert (clf.network_input_limit(), clf.network_input_limit(True), clf.activation_limit()) == (1, 1, 1)


# -- safety: refused globals, damaged files, pickles of other things -----------------------

class _Reduce:
    """An object whose unpickling calls ``func(*args)``."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict:
    return {
        "os.system": _Reduce(os.system, (f"touch {marker}",)),
        "builtins.eval": _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.call": _Reduce(subprocess.call, (["touch", str(marker)],)),
        "builtins.open": _Reduce(builtins.open, (str(marker), "w")),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call", "builtins.open"])
def test_malicious_pickle_is_refused_and_runs_nothing(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    # hidden inside what looks like a snapshot, next to an 'ema' entry
    path = tmp_path / "network-snapshot.pkl"
    path.write_bytes(pickle.dumps({"ema": None, "loss_fn": payload, "dataset_kwargs": {}}, protocol=4))
    with pytest.raises(EdmImportError) as info:
        load_checkpoint(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    # the global as pickled (os.system is posix.system, builtins.open is io.open)
    assert f"{payload.func.__module__}.{payload.func.__qualname__}" in message
    assert not marker.exists()


def test_the_malicious_payload_is_real(tmp_path: Path) -> None:
    """The same bytes given to plain pickle do create the file (so the refusal above matters)."""
    marker = tmp_path / "pwned"
    data = pickle.dumps(_payloads(marker)["builtins.open"])
    pickle.loads(data).close()
    assert marker.exists()


def test_malicious_global_inside_a_storage_is_refused(tmp_path: Path) -> None:
    """A refused global inside a pickled storage's bytes (the inner torch.save pickle)."""
    marker = tmp_path / "pwned"
    inner = pickle.dumps(LEGACY_MAGIC_VALUE, protocol=2) + pickle.dumps(1001, protocol=2) + \
        pickle.dumps({"little_endian": True}, protocol=2) + pickle.dumps(_payloads(marker)["os.system"], protocol=2)

    class _Blob:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (inner,)

    path = tmp_path / "snap.pkl"
    path.write_bytes(pickle.dumps({"ema": _Blob()}, protocol=4))
    with pytest.raises(EdmImportError, match="refused") as info:
        read_snapshot(path)
    assert f"{os.system.__module__}.system" in str(info.value)
    assert not marker.exists()


LEGACY_MAGIC_VALUE = 0x1950A86A20F9469CFC6C


@pytest.mark.parametrize("fraction", [0.0001, 0.1, 0.5, 0.999])
def test_truncated_snapshot(fraction: float, tmp_path: Path) -> None:
    data = (FIXTURES / "vp-ddpmpp-cond.pkl").read_bytes()
    path = tmp_path / "truncated.pkl"
    path.write_bytes(data[: max(2, int(len(data) * fraction))])
    with pytest.raises(EdmImportError, match="truncated") as info:
        load_checkpoint(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("obj, pattern", [
    ([1, 2, 3], "not an EDM snapshot: the pickle holds a list"),
    ({"loss_fn": None, "augment_pipe": None, "dataset_kwargs": {}}, "no 'ema' network"),
    ({"ema": {"weights": 1}}, "not an EDM network"),
    (np.float64(1.5), "not an EDM snapshot"),
])
def test_pickles_of_other_things(obj, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(EdmImportError, match=pattern) as info:
        load_checkpoint(str(path))
    assert "\n" not in str(info.value)


def test_other_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(EdmImportError, match="empty"):
        read_snapshot(empty)
    text = tmp_path / "notes.pkl"
    text.write_text("hello")
    with pytest.raises(EdmImportError, match="not a pickle"):
        read_snapshot(text)
    zipped = tmp_path / "state.pkl"
    torch.save({"w": torch.zeros(2)}, zipped)
    with pytest.raises(EdmImportError, match="zip"):
        read_snapshot(zipped)
    with pytest.raises(CheckpointError, match="cannot read"):
        read_snapshot(tmp_path / "missing.pkl")
    # a pickled torch tensor in the modern layout is refused rather than loaded through torch
    tensor = tmp_path / "tensor.pkl"
    tensor.write_bytes(pickle.dumps(torch.zeros(3)))
    with pytest.raises(EdmImportError, match="not an EDM snapshot"):
        load_checkpoint(str(tensor))


# -- the command line ----------------------------------------------------------------------

def test_cli_import_edm_and_classify_with_a_pkl(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from rdc_studio.core.cli import main

    out_dir = tmp_path / "models"
    out_dir.mkdir()
    assert main(["import-edm", str(FIXTURES / "edm-ddpmpp-cond.pkl"), "--out", str(out_dir)]) == 0
    weights = out_dir / "edm-ddpmpp-cond.safetensors"
    assert weights.exists() and weights.with_suffix(".json").exists()
    assert "use it with --model" in capsys.readouterr().out

    img = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(img)
    for model in (str(FIXTURES / "vp-ddpmpp-cond.pkl"), str(weights)):
        assert main(["classify", str(img), "--model", model, "--steps", "2", "--threads", "1",
                     "--device", "cpu", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)["results"][0]
        assert 0 <= result["predicted"] < 10 and len(result["probabilities"]) == 10


def test_cli_import_edm_refuses_a_malicious_pickle(tmp_path: Path) -> None:
    from rdc_studio.core.cli import main

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(_payloads(marker)["os.system"]))
    with pytest.raises(SystemExit) as info:
        main(["import-edm", str(bad), "--out", str(tmp_path / "x")])
    assert str(info.value).startswith("rdc: error: ") and "refused" in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def test_cli_classify_with_an_unconditional_model_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from rdc_studio.core.cli import main

    img = tmp_path / "cat.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype="uint8")).save(img)
    code = main(["classify", str(img), "--model", str(FIXTURES / "vp-ddpmpp-uncond.pkl"),
                 "--threads", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("rdc: error: ") and "unconditional" in err and "\n" not in err


# -- a classifier + purifier pair (the paper's two checkpoints) as one model ----------------

@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """The conditional fixture as classifier, the unconditional one as purifier, imported as one model."""
    out = tmp_path / "models"
    return import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", str(out) + os.sep, command="rdc import-edm pair",
                      purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")


def test_a_class_conditional_purifier_is_refused(tmp_path: Path) -> None:
    """EDM's conditional networks have no null label: the likelihood maximisation needs an unconditional one."""
    with pytest.raises(EdmImportError, match="purifier must be an unconditional"):
        import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", str(tmp_path / "models") + os.sep,
                   purifier=FIXTURES / "edm-ddpmpp-cond.pkl")


def test_pair_card_names_its_purifier_and_loads_as_one_model(pair: Path) -> None:
    from rdc_studio.core.models import file_sha256, list_model_names

    card = json.loads(pair.with_suffix(".json").read_text())
    purifier_file = pair.parent / "vp-ddpmpp-uncond.safetensors"
    assert card["purifier"] == {"path": "vp-ddpmpp-uncond.safetensors", "sha256": file_sha256(purifier_file)}
    assert json.loads(purifier_file.with_suffix(".json").read_text())["role"] == "purifier"
    model = load_checkpoint(pair)
    assert model.classes == [str(i) for i in range(10)] and model.purifier is not None
    assert model.purifier.classes == [] and model.purifier_net is model.purifier.net
    assert model.purifier_net.config.num_classes == 0 and model.net.config.num_classes == 10
    assert list_model_names(pair.parent) == ["vp-ddpmpp-cond"]  # one entry, not two


def test_pair_purifies_with_the_purifier_and_classifies_with_the_classifier(pair: Path) -> None:
    from rdc_studio.core.classifier import build_classifier
    from rdc_studio.core.defense import build_defense, build_maximizer, purify_settings
    from rdc_studio.core.purify import LikelihoodMaximizer

    model = load_checkpoint(pair)
    uncond = load_checkpoint(FIXTURES / "vp-ddpmpp-uncond.pkl").net
    settings = purify_settings(model, steps=2)
    x = torch.rand(1, 3, 16, 16)
    expected = LikelihoodMaximizer(uncond, settings)(x)
    assert torch.allclose(build_maximizer(model, settings)(x), expected, atol=1e-6)
    own_head = LikelihoodMaximizer(model.net, settings)(x)  # the conditional net's all-zero label
    assert not torch.allclose(own_head, expected)
    clf = build_classifier(model, steps=2, sigma_min=0.05, sigma_max=2.0)
    rdc = build_defense("rdc", model, clf, purify=settings, grad_mode="bpda")
    assert rdc.maximizer.net is model.purifier_net and rdc.classifier.net is model.net
    assert torch.allclose(rdc.purify(x), expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(rdc(x), clf(expected), atol=1e-4)
    # the mixture score needs the class heads: it uses the classifier's network
    mixture = purify_settings(model, steps=1, score="mixture")
    assert build_maximizer(model, mixture).net is model.net


def test_pair_with_a_changed_or_missing_purifier_is_refused(pair: Path) -> None:
    purifier_file = pair.parent / "vp-ddpmpp-uncond.safetensors"
    data = bytearray(purifier_file.read_bytes())
    data[-1] ^= 1
    purifier_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not have the sha256"):
        load_checkpoint(pair)
    purifier_file.unlink()
    with pytest.raises(CheckpointError, match="purifier vp-ddpmpp-uncond.safetensors was not found"):
        load_checkpoint(pair)


def test_pair_import_errors(tmp_path: Path) -> None:
    with pytest.raises(EdmImportError, match="unconditional network cannot classify"):
        import_edm(FIXTURES / "vp-ddpmpp-uncond.pkl", tmp_path / "x", purifier=FIXTURES / "vp-ddpmpp-cond.pkl")
    with pytest.raises(EdmImportError, match="unknown preset"):
        import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", tmp_path / "y", preset="papr")
    # an existing checkpoint as purifier is referenced where it is
    uncond = import_edm(FIXTURES / "vp-ddpmpp-uncond.pkl", tmp_path / "shared" / "uncond")
    path = import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", tmp_path / "mine" / "cond", purifier=uncond, preset="fast")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["purifier"]["path"] == "../shared/uncond.safetensors" and card["preset"] == "fast"
    assert load_checkpoint(path).purifier.path == uncond


def test_cli_import_a_pair_and_attack_it(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from rdc_studio.core.cli import main

    out = tmp_path / "cifar-pair"
    assert main(["import-edm", str(FIXTURES / "vp-ddpmpp-cond.pkl"), "--purifier",
                 str(FIXTURES / "vp-ddpmpp-uncond.pkl"), "--out", str(out)]) == 0
    assert "purifier vp-ddpmpp-uncond.safetensors" in capsys.readouterr().out
    img = tmp_path / "cat.png"
    Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype("uint8")).save(img)
    report = tmp_path / "attack.json"
    assert main(["attack", str(img), "--model", str(out.with_suffix(".safetensors")), "--defense", "rdc",
                 "--preset", "paper", "--levels", "2", "--lm-steps", "1", "--steps", "1", "--eps", "8/255",
                 "--threads", "1", "--device", "cpu", "--quiet", "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["purify"]["preset"] == "paper" and rep["linf"] <= 8 / 255 + 1e-6


# -- resource limits: tensors, storages, module trees and sizes a snapshot declares ----------

class _LoadFromBytes:
    """Unpickles as ``torch.storage._load_from_bytes(blob)``: a storage saved by torch.save."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


class _Tensor:
    """Unpickles as ``torch._utils._rebuild_tensor_v2`` with any geometry on ``storage``."""

    def __init__(self, storage, size: tuple, stride: tuple) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False,
                                                 collections.OrderedDict())


def _legacy_storage(numel: int) -> bytes:
    """A float storage of ``numel`` zeros in torch.save's legacy layout (as pickled tensors carry it)."""
    storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(numel).untyped_storage(), dtype=torch.float32,
                                         _internal=True)
    return storage.__reduce__()[1][0]


class _StorageRef:
    """Pickled by :func:`_zip_storage` as the persistent id of its one storage."""


def _zip_storage(numel: int, data: bytes) -> bytes:
    """A torch.save zip archive of one float storage declaring ``numel`` elements, ``data`` deflated."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _StorageRef) else None

    pkl = io.BytesIO()
    Pickler(pkl, protocol=2).dump(_StorageRef())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl.getvalue())
        z.writestr("archive/data/0", data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _write(obj, tmp_path: Path, name: str = "crafted.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize("numel, size, stride", [
    (1, (20000, 20000), (0, 0)),  # 1.6 GB from one element
    (3, (2, 2), (1, 1)),  # more elements than the storage holds, though the last one is inside it
    (4, (2, 2), (1, 1)),  # overlapping rows
    (4, (4, 1), (0, 1)),  # a zero stride
])
def test_a_tensor_larger_than_its_storage_or_overlapping_is_refused(numel, size, stride, tmp_path: Path) -> None:
    path = _write({"ema": None, "junk": _Tensor(_LoadFromBytes(_legacy_storage(numel)), size, stride)}, tmp_path)
    with pytest.raises(EdmImportError, match="elements|overlap") as info:
        read_snapshot(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_tensor_geometries_a_network_holds_are_read(tmp_path: Path) -> None:
    storage = _LoadFromBytes(_legacy_storage(6))
    path = _write({"t": _Tensor(storage, (2, 3), (3, 1)), "tt": _Tensor(storage, (3, 2), (1, 3)),
                   "one": _Tensor(storage, (1, 3), (0, 1)), "empty": _Tensor(storage, (0, 5), (0, 0))}, tmp_path)
    out = read_snapshot(path)
    assert [tuple(out[k].shape) for k in ("t", "tt", "one", "empty")] == [(2, 3), (3, 2), (1, 3), (0, 5)]


@pytest.mark.parametrize("what", ["storages", "tensors"])
def test_one_blob_decoded_again_and_again_is_refused(what: str, tmp_path: Path) -> None:
    """Pickle memo references repeat a 1 MiB storage 40 times: 40 MiB from a 1 MiB file."""
    blob = _legacy_storage(2 ** 18)
    if what == "storages":
        junk = [_LoadFromBytes(blob) for _ in range(40)]  # the same bytes object, memoized once
    else:
        storage = _LoadFromBytes(blob)
        junk = [_Tensor(storage, (2 ** 18,), (1,)) for _ in range(40)]
    path = _write({"ema": None, "junk": junk}, tmp_path)
    assert path.stat().st_size < 2 ** 21
    with pytest.raises(EdmImportError, match="bytes"):
        read_snapshot(path)


def test_zipped_storages_are_checked_before_they_are_decompressed(tmp_path: Path, monkeypatch) -> None:
    good = _write({"s": _LoadFromBytes(_zip_storage(3, bytes(12)))}, tmp_path, "good.pkl")
    assert read_snapshot(good)["s"].data.numel() == 3
    read: list[str] = []
    original = zipfile.ZipFile.read

    def spy(self, name, *args):
        read.append(str(name))
        return original(self, name, *args)

    monkeypatch.setattr(zipfile.ZipFile, "read", spy)
    # the entry is larger than its declared storage / a zip bomb within its declaration
    for numel in (3, 2 ** 23):
        path = _write({"ema": None, "s": _LoadFromBytes(_zip_storage(numel, bytes(2 ** 25)))}, tmp_path)
        assert path.stat().st_size < 2 ** 17
        read.clear()
        with pytest.raises(EdmImportError, match="bytes"):
            read_snapshot(path)
        assert "archive/data/0" not in read


def _reconstruct_persistent_obj(meta):  # only its name is pickled, as torch_utils.persistence's
    raise AssertionError("not to be called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


def _dump_records(obj, path: Path, monkeypatch) -> Path:
    """Pickle a snapshot as read by read_snapshot (possibly edited) back in EDM's format."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
    containers = {"ModuleDict": torch.nn.ModuleDict, "ModuleList": torch.nn.ModuleList,
                  "Sequential": torch.nn.Sequential}

    class Pickler(pickle.Pickler):
        def reducer_override(self, value):
            if isinstance(value, PersistentRecord):
                return _reconstruct_persistent_obj, ({"type": "class", "class_name": value.class_name,
                                                      "state": value.state, "version": value.version,
                                                      "module_src": "# source"},)
            if isinstance(value, ModuleRecord):  # the object, then its state: a cycle through it pickles
                return containers[value.class_name], (), value.state
            return NotImplemented

    with open(path, "wb") as f:
        Pickler(f, protocol=4).dump(obj)
    return path


def test_a_module_tree_with_a_cycle_is_refused(tmp_path: Path, monkeypatch) -> None:
    snapshot = read_snapshot(FIXTURES / "vp-ddpmpp-uncond.pkl")
    enc = snapshot["ema"].state["_modules"]["model"].state["_modules"]["enc"]
    enc.state["_modules"]["loop"] = enc
    path = _dump_records({"ema": snapshot["ema"]}, tmp_path / "cycle.pkl", monkeypatch)
    with pytest.raises(EdmImportError, match="cycle") as info:
        convert(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="cycle"):
        load_checkpoint(str(path))
    from rdc_studio.core.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["import-edm", str(path), "--out", str(tmp_path / "x")])
    assert str(exit_info.value).startswith("rdc: error: ") and "cycle" in str(exit_info.value)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("key, value, pattern", [
    (None, None, None),  # the re-pickled snapshot itself converts
    ("model_channels", 40000, "model_channels"),
    ("img_resolution", 4096, "img_resolution"),
    ("num_blocks", 10 ** 6, "num_blocks"),
    ("channel_mult", [1] * 1000, "channel_mult"),
    ("label_dim", 10 ** 9, "label_dim"),
])
def test_an_oversized_declared_network_is_refused(key, value, pattern, tmp_path: Path, monkeypatch) -> None:
    snapshot = read_snapshot(FIXTURES / "vp-ddpmpp-uncond.pkl")
    if key is not None:
        snapshot["ema"].state["_modules"]["model"].state["_init_kwargs"][key] = value
    path = _dump_records({"ema": snapshot["ema"]}, tmp_path / "big.pkl", monkeypatch)
    if pattern is None:
        assert convert(path)[0].config.to_dict() == convert(FIXTURES / "vp-ddpmpp-uncond.pkl")[0].config.to_dict()
        return
    with pytest.raises(EdmImportError, match=pattern) as info:
        convert(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_declared_network_is_checked_against_its_tensors_before_it_is_allocated(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    import rdc_studio.core.edm_import as edm_import

    snapshot = read_snapshot(FIXTURES / "vp-ddpmpp-uncond.pkl")
    snapshot["ema"].state["_modules"]["model"].state["_init_kwargs"]["model_channels"] = 64
    path = _dump_records({"ema": snapshot["ema"]}, tmp_path / "wide.pkl", monkeypatch)
    devices: list[str] = []

    def spy(config):
        devices.append(torch.empty(0).device.type)
        return EdmDenoiser(config)

    monkeypatch.setattr(edm_import, "EdmDenoiser", spy)
    with pytest.raises(EdmImportError, match="shape|match"):
        convert(path)
    assert devices and set(devices) == {"meta"}  # built for its shapes only


@pytest.mark.parametrize("error", [MemoryError, RuntimeError])
def test_running_out_of_memory_while_building_is_a_refusal(error, monkeypatch) -> None:
    import rdc_studio.core.edm_import as edm_import

    def failing(config):
        if torch.empty(0).device.type != "meta":
            raise error("DefaultCPUAllocator: can't allocate memory")
        return EdmDenoiser(config)

    monkeypatch.setattr(edm_import, "EdmDenoiser", failing)
    with pytest.raises(EdmImportError, match="allocate"):
        convert(FIXTURES / "vp-ddpmpp-uncond.pkl")


# -- a purifier whose output would be the classifier's file -----------------------------

def test_a_purifier_with_the_classifiers_file_name_gets_its_own(tmp_path: Path, capsys) -> None:
    """EDM names every run's snapshots alike: runA/ and runB/network-snapshot-200000.pkl."""
    from rdc_studio.core.cli import main

    for run, name in (("runA", "vp-ddpmpp-cond"), ("runB", "vp-ddpmpp-uncond")):
        (tmp_path / run).mkdir()
        shutil.copy(FIXTURES / f"{name}.pkl", tmp_path / run / "network-snapshot-200000.pkl")
    out = tmp_path / "models2"
    assert main(["import-edm", str(tmp_path / "runA" / "network-snapshot-200000.pkl"), "--purifier",
                 str(tmp_path / "runB" / "network-snapshot-200000.pkl"), "--out", str(out) + os.sep]) == 0
    assert "purifier network-snapshot-200000-purifier.safetensors" in capsys.readouterr().out
    weights = out / "network-snapshot-200000.safetensors"
    purifier_file = out / "network-snapshot-200000-purifier.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["purifier"]["path"] == purifier_file.name and "role" not in card
    p_card = json.loads(purifier_file.with_suffix(".json").read_text())
    assert p_card["role"] == "purifier" and p_card["name"] == purifier_file.stem
    model = load_checkpoint(weights)
    assert model.net.config.num_classes == 10 and model.purifier.net.config.num_classes == 0

    # --out naming the file the purifier would be written to
    dest = tmp_path / "m3" / "vp-ddpmpp-uncond.safetensors"
    path = import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", dest, purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")
    assert path == dest
    model = load_checkpoint(path)
    assert model.net.config.num_classes == 10 and model.purifier.path.name == "vp-ddpmpp-uncond-purifier.safetensors"
    assert model.purifier.net.config.num_classes == 0


def test_an_output_over_a_purifier_checkpoint_is_refused(tmp_path: Path) -> None:
    uncond = import_edm(FIXTURES / "vp-ddpmpp-uncond.pkl", tmp_path / "uncond")
    before = uncond.read_bytes()
    with pytest.raises(EdmImportError, match="overwrite"):
        import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", tmp_path / "uncond", purifier=uncond)
    assert uncond.read_bytes() == before


def test_a_purifier_conversion_never_overwrites_another_file_and_reuses_its_own(tmp_path: Path) -> None:
    from rdc_studio.core.models import file_sha256

    out = tmp_path / "models"
    out.mkdir()
    stranger = import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", out / "vp-ddpmpp-uncond.safetensors")  # another model there
    before = stranger.read_bytes(), stranger.with_suffix(".json").read_bytes()
    with pytest.raises(EdmImportError, match="is not a conversion of vp-ddpmpp-uncond.pkl"):
        import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", out / "cond", purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")
    assert (stranger.read_bytes(), stranger.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in out.iterdir()) == ["vp-ddpmpp-uncond.json", "vp-ddpmpp-uncond.safetensors"]

    stranger.unlink()
    stranger.with_suffix(".json").write_text("{}")  # a stray card alone is not the conversion either
    with pytest.raises(EdmImportError, match="is not a conversion"):
        import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", out / "cond", purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")
    stranger.with_suffix(".json").unlink()

    first = import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", out / "a", purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")
    purifier_file = out / "vp-ddpmpp-uncond.safetensors"
    digest = file_sha256(purifier_file)
    second = import_edm(FIXTURES / "vp-ddpmpp-cond.pkl", out / "b", purifier=FIXTURES / "vp-ddpmpp-uncond.pkl")
    assert file_sha256(purifier_file) == digest  # reused, not rewritten: the first pair still loads
    for path in (first, second):
        assert load_checkpoint(path).purifier.path == purifier_file

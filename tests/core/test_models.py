import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rdc_studio.core.models import (CheckpointError, defense_settings_sha256, load_checkpoint, read_card,
                                    save_checkpoint, update_card_entries)


def test_round_trip(tiny_checkpoint, tiny_net):
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.name == "tiny" and loaded.classes == [str(i) for i in range(10)]
    x, s = torch.randn(2, 1, 28, 28), torch.ones(2)
    with torch.no_grad():
        assert torch.equal(loaded.net.denoise(x, s), tiny_net.denoise(x, s))
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    assert card["net"]["channels"] == [8, 16]


def test_loads_from_embedded_card_without_json(tiny_checkpoint):
    tiny_checkpoint.with_suffix(".json").unlink()
    assert load_checkpoint(tiny_checkpoint).name == "tiny"


def test_read_card_and_update_several_entries_at_once(tiny_checkpoint):
    before = read_card(tiny_checkpoint)
    assert before == load_checkpoint(tiny_checkpoint).card
    side = update_card_entries(tiny_checkpoint, {"purify": {"eta": 0.2}, "metrics": {"val": 1}})
    after = read_card(tiny_checkpoint)
    assert side == tiny_checkpoint.with_suffix(".json")
    assert after["purify"] == {"eta": 0.2} and after["metrics"] == {"val": 1}
    assert {k: v for k, v in after.items() if k not in ("purify", "metrics")} == \
        {k: v for k, v in before.items() if k not in ("purify", "metrics")}
    side.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_card(tiny_checkpoint)


def test_defense_settings_digest_follows_only_the_defense_entries(tiny_checkpoint):
    card = read_card(tiny_checkpoint)
    digest = defense_settings_sha256(card)
    assert len(digest) == 64 and digest == defense_settings_sha256(dict(reversed(list(card.items()))))
    # metrics, OOD references and the like do not configure a defense
    assert defense_settings_sha256(card | {"metrics": {"val": 0.5}, "ood_reference": [1, 2]}) == digest
    # a re-chosen grid, purification, preset or purifier does (the weights file stays the same)
    changed = [card | {"classifier": dict(card.get("classifier") or {}, steps=99)},
               card | {"purify": {"eta": 0.123}}, card | {"preset": "fast"},
               card | {"purifier": {"path": "p.safetensors", "sha256": "0" * 64}}]
    digests = {defense_settings_sha256(c) for c in changed}
    assert digest not in digests and len(digests) == len(changed)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, tiny_checkpoint):
    """An image or a torch .pt file given as the model: said so, not looked up as NAME.safetensors."""
    for name in ("digit.png", "weights.pt"):
        other = tiny_checkpoint.with_name(name)
        other.write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointError, match=f"{name}: not a checkpoint; give a .safetensors file"):
            load_checkpoint(other)


def test_unknown_bundled_name():
    with pytest.raises(CheckpointError, match="no bundled model named"):
        load_checkpoint("definitely-not-a-model")


def test_garbage_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)


def test_pickle_is_never_loaded(tmp_path, tiny_net):
    # a torch.save pickle renamed to .safetensors must be rejected, not unpickled
    bad = tmp_path / "pickled.safetensors"
    torch.save(tiny_net.state_dict(), bad)
    with pytest.raises(CheckpointError, match="pickled.safetensors"):
        load_checkpoint(bad)


def test_invalid_json_card(tiny_checkpoint):
    tiny_checkpoint.with_suffix(".json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tiny_checkpoint)


def test_wrong_format_card(tiny_checkpoint):
    tiny_checkpoint.with_suffix(".json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tiny_checkpoint)


def test_tensors_not_matching_config(tiny_checkpoint):
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    card["net"]["channels"] = [16, 32]
    tiny_checkpoint.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tiny_checkpoint)


def _card_of(path):
    """The metadata that embeds a checkpoint's JSON card (weights rewritten by hand keep the pair whole)."""
    return {"rdc_card": path.with_suffix(".json").read_text()}


def test_missing_tensor(tmp_path, tiny_net):
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_net, {"dataset": "mnist", "classes": list("0123456789")})
    tensors = dict(tiny_net.state_dict())
    tensors.pop("conv_in.weight")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=_card_of(path))
    with pytest.raises(CheckpointError, match="missing.*conv_in.weight"):
        load_checkpoint(path)


def test_nan_weights_rejected(tmp_path, tiny_net):
    sd = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    sd["conv_in.weight"][0, 0, 0, 0] = float("nan")
    tiny_net.load_state_dict(sd)
    path = save_checkpoint(tmp_path / "nan.safetensors", tiny_net, {"dataset": "mnist", "classes": list("0123456789")})
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(path)


def test_bad_net_config(tiny_checkpoint):
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    card["net"]["architecture"] = "transformer"
    tiny_checkpoint.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="invalid network config"):
        load_checkpoint(tiny_checkpoint)


def test_class_count_mismatch(tmp_path, tiny_net):
    path = save_checkpoint(tmp_path / "c.safetensors", tiny_net, {"dataset": "mnist", "classes": ["a", "b"]})
    with pytest.raises(CheckpointError, match="class names"):
        load_checkpoint(path)


def test_save_leaves_no_partial_files(tmp_path, tiny_net):
    save_checkpoint(tmp_path / "ok.safetensors", tiny_net, {"dataset": "mnist", "classes": list("0123456789")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "ok.safetensors"]


def test_saved_files_get_normal_permissions(tmp_path, tiny_net):
    import os
    import stat

    path = save_checkpoint(tmp_path / "p.safetensors", tiny_net, {"dataset": "mnist", "classes": list("0123456789")})
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, path.with_suffix(".json")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def _with_card(checkpoint, **changes):
    side = checkpoint.with_suffix(".json")
    side.write_text(json.dumps(json.loads(side.read_text()) | changes))
    return checkpoint


@pytest.mark.parametrize("changes,message", [
    ({"classes": 10}, "classes must be a list of names"),
    ({"classes": [["0"]] * 10}, "classes must be a list of names"),
    ({"classes": ["0"] * 10}, "names a class twice"),
    ({"classifier": [1, 2]}, "'classifier' must be an object"),
    ({"preset": ["x"]}, "'preset' must be a name"),
    ({"name": 5}, "'name' must be a name, not 5"),
    ({"classifier": {"steps": "16"}}, "settings are unusable .*steps must be a whole number"),
    ({"classifier": {"steps": 10**9}}, "steps must be a whole number in 1-4096"),
    ({"classifier": {"sigma_min": "x"}}, "sigma_min must be a positive number"),
    ({"classifier": {"levels_per_pass": -3}}, "levels_per_pass must be a whole number"),
    ({"purify": {"optimizer": "bogus"}}, "settings are unusable"),
    ({"purify": {"setps": 3}}, "settings are unusable .*setps"),
    ({"classifier": {"levles": 16}}, "settings are unusable .*unknown setting 'levles'"),
    ({"preset": "nonexistent"}, "settings are unusable .*preset"),
    ({"ood_reference": {"settings": [1], "probabilities": [0, 1], "quantiles": [1, 2]}}, "settings are unusable"),
    ({"ood_reference": {"settings": {"levels": 2.5}, "probabilities": [0, 1], "quantiles": [1, 2]}},
     "levels must be a whole number"),
])
def test_a_card_of_wrong_types_or_unusable_settings_is_one_clear_error(tiny_checkpoint, changes, message):
    """Every job of such a model would fail later with a traceback (or the app would be left
    with a model it cannot use): the loader refuses it."""
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_with_card(tiny_checkpoint, **changes))


@pytest.mark.parametrize("net_change", [{"channels": [8, 200000]}, {"emb_dim": 2000000}, {"image_size": 100000},
                                        {"blocks_per_level": 100000}, {"image_size": -28}, {"image_size": 28.0}])
def test_a_network_config_beyond_any_real_one_is_refused_before_it_is_built(tiny_checkpoint, net_change):
    card = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="invalid network config .*must be a whole number"):
        load_checkpoint(_with_card(tiny_checkpoint, net=card["net"] | net_change))


def test_a_card_that_is_no_regular_file_or_an_embedded_card_of_bad_json_is_refused(tiny_checkpoint, tmp_path):
    side = tiny_checkpoint.with_suffix(".json")
    side.unlink()
    side.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tiny_checkpoint)
    side.rmdir()
    tensors = load_checkpoint.__globals__["load_file"](str(tiny_checkpoint))
    save_file(tensors, str(tiny_checkpoint), metadata={"rdc_card": "{not json"})
    with pytest.raises(CheckpointError, match="embedded model card is not valid JSON"):
        load_checkpoint(tiny_checkpoint)


def test_a_small_card_cannot_make_the_loader_build_a_huge_network(tmp_path):
    """The card's network is compared with the file's tensor header on the meta device: a
    400-byte pair describing 1.75 GiB of weights is refused before anything is allocated
    (before, the loader built and initialised the whole network first: 2.4 GiB of memory).
    Measured in a fresh process, by its peak resident memory."""
    import os
    import subprocess
    import sys

    net = {"architecture": "embedding", "image_size": 32, "in_channels": 1, "num_classes": 10,
           "channels": [512, 512, 512, 512], "blocks_per_level": 8, "emb_dim": 2048, "head_channels": [8],
           "dropout": 0.0}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "big.safetensors"))
    (tmp_path / "big.json").write_text(json.dumps({"format": "rdc-studio/diffusion-classifier", "format_version": 1,
                                                   "classes": [str(i) for i in range(10)], "net": net}))
    script = ("import resource, sys, torch\n"
              "from rdc_studio.core.models import CheckpointError, load_checkpoint\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as exc:\n    print(exc)\n"
              "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.safetensors")], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True).stdout.splitlines()
    assert "tensors do not match the config: missing" in out[0] and "unexpected ['x']" in out[0]
    assert int(out[1]) < 200  # MiB of peak memory the load added (the network alone is 1790 MiB)


def test_integer_weights_of_the_right_shape_are_refused(tmp_path, tiny_net):
    path = save_checkpoint(tmp_path / "i.safetensors", tiny_net, {"dataset": "mnist", "classes": list("0123456789")})
    tensors = {k: v.contiguous() for k, v in tiny_net.state_dict().items()}
    tensors["conv_in.weight"] = tensors["conv_in.weight"].to(torch.int8)
    save_file(tensors, str(path), metadata=_card_of(path))
    with pytest.raises(CheckpointError, match="conv_in.weight' is I8, the network holds torch.float32"):
        load_checkpoint(path)


def test_a_purifier_that_is_the_model_itself_or_loops_back_is_refused_at_once(tmp_path, tiny_net):
    card = {"dataset": "mnist", "classes": list("0123456789")}
    a = save_checkpoint(tmp_path / "a.safetensors", tiny_net, card | {"purifier": {"path": "a.safetensors"}})
    with pytest.raises(CheckpointError, match="names the model itself as its purifier"):
        load_checkpoint(a)
    a = save_checkpoint(tmp_path / "a.safetensors", tiny_net, card | {"purifier": {"path": "b.safetensors"}})
    save_checkpoint(tmp_path / "b.safetensors", tiny_net, card | {"purifier": {"path": "a.safetensors"}})
    with pytest.raises(CheckpointError, match="its purifier b.safetensors names a purifier of its own"):
        load_checkpoint(a)


def test_a_card_linked_to_a_device_is_never_read(tmp_path, tiny_checkpoint):
    """/dev/zero as a card would be read until memory runs out."""
    import os

    from rdc_studio.core.models import is_cnn_card

    if not os.path.exists("/dev/zero"):
        pytest.skip("needs /dev/zero")
    weights = tmp_path / "z.safetensors"
    weights.write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "z.json").symlink_to("/dev/zero")
    assert not is_cnn_card(weights)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(weights)


@pytest.mark.parametrize("card_text", ["[1, 2]", b"\xff\xfe\x00", "/dev/zero"])
def test_a_cnn_card_of_another_shape_or_a_device_is_a_checkpoint_error(tmp_path, card_text):
    import os

    from rdc_studio.core.baseline import SmallCNN, load_cnn, save_cnn

    weights = save_cnn(tmp_path / "c.safetensors", SmallCNN().eval(), {"name": "c"})
    side = weights.with_suffix(".json")
    side.unlink()
    if card_text == "/dev/zero":
        if not os.path.exists("/dev/zero"):
            pytest.skip("needs /dev/zero")
        side.symlink_to("/dev/zero")
    elif isinstance(card_text, bytes):
        side.write_bytes(card_text)
    else:
        side.write_text(card_text)
    with pytest.raises(CheckpointError):
        load_cnn(weights)


def test_read_json_object_refuses_every_kind_of_bad_file_with_one_line(tmp_path):
    import os

    from rdc_studio.core.models import read_json_object

    class Bad(ValueError):
        pass

    cases = {"missing.json": None, "folder.json": "dir", "garbage.json": b"{oops", "latin.json": b'{"a": "\xff"}',
             "list.json": b"[1, 2]", "big.json": b"{}" + b" " * 100}
    for name, content in cases.items():
        if content == "dir":
            (tmp_path / name).mkdir()
        elif content is not None:
            (tmp_path / name).write_bytes(content)
    expected = {"missing.json": "no such file", "folder.json": "not a regular file", "garbage.json": "not valid JSON",
                "latin.json": "not valid JSON", "list.json": "a JSON list, not an object",
                "big.json": "102 bytes is too large for a thing"}
    for name, message in expected.items():
        with pytest.raises(Bad, match=message) as info:
            read_json_object(tmp_path / name, "thing", Bad, max_bytes=100)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        with pytest.raises(Bad, match="not a regular file"):
            read_json_object(tmp_path / "zero.json", "thing", Bad)
    (tmp_path / "ok.json").write_text('{"a": 1}')
    assert read_json_object(tmp_path / "ok.json", "thing") == {"a": 1}


def test_listing_a_folder_never_reads_a_card_linked_to_a_device(tmp_path, tiny_checkpoint):
    import os

    from rdc_studio.core.models import list_model_names

    if not os.path.exists("/dev/zero"):
        pytest.skip("needs /dev/zero")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "m.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    (folder / "m.json").write_text(tiny_checkpoint.with_suffix(".json").read_text())
    (folder / "z.json").symlink_to("/dev/zero")
    (folder / "list.json").write_text("[1]")
    assert list_model_names(folder) == ["m"]


def test_a_pipe_or_device_as_the_weights_is_refused_not_read_forever(tmp_path, tiny_checkpoint):
    import os

    from rdc_studio.core.edm_import import EdmImportError, read_snapshot

    if not hasattr(os, "mkfifo"):
        pytest.skip("needs named pipes")
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(CheckpointError, match="pipe.safetensors: the checkpoint is not a regular file"):
        load_checkpoint(tmp_path / "pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.pkl")
    with pytest.raises(EdmImportError, match="pipe.pkl: not a regular file"):
        load_checkpoint(tmp_path / "pipe.pkl")
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.pkl").symlink_to("/dev/zero")
        with pytest.raises(EdmImportError, match="not a regular file"):
            read_snapshot(tmp_path / "zero.pkl")


def test_files_in_the_working_directory_do_not_hide_a_bundled_model(tmp_path, monkeypatch, tiny_checkpoint):
    """A folder named like the default model (e.g. ``rdc train --out mnist-embedding``) hid it;
    a run folder given as a path means its model.safetensors; a dotted name keeps its dot."""
    from rdc_studio.core.models import DEFAULT_MODEL, resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL).mkdir()
    (tmp_path / DEFAULT_MODEL / "model.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    assert resolve_model_path(None).parent.name == "models" and resolve_model_path(None).stem == DEFAULT_MODEL
    assert resolve_model_path(DEFAULT_MODEL) == resolve_model_path(None)
    assert resolve_model_path(f"{DEFAULT_MODEL}/") == Path(DEFAULT_MODEL) / "model.safetensors"
    assert resolve_model_path(f"./{DEFAULT_MODEL}") == Path(".") / DEFAULT_MODEL / "model.safetensors"
    (tmp_path / "myrun").mkdir()
    with pytest.raises(CheckpointError, match="no bundled model named 'myrun'.*for the folder myrun here, give ./myrun"):
        resolve_model_path("myrun")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "cnn-v1.5.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    assert resolve_model_path("v/cnn-v1.5") == Path("v/cnn-v1.5.safetensors")


def test_deeply_nested_json_is_a_one_line_error(tmp_path):
    from rdc_studio.core.models import read_json_object

    (tmp_path / "deep.json").write_text("{\"a\": " + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match="deep.json: the model card is not valid JSON .nested too deeply"):
        read_json_object(tmp_path / "deep.json", "model card", CheckpointError)


@pytest.mark.parametrize("n, epochs", [(40, 1e-6), (5, 1.0)])
def test_cnn_training_takes_at_least_one_step(n, epochs):
    """Before, a small --epochs (or a set smaller than a batch) trained 0 steps and wrote an
    untrained CNN without a word, or divided by zero."""
    from rdc_studio.core.baseline import train_cnn
    from rdc_studio.core.data import TensorDataset

    gen = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8),
                       torch.arange(n) % 10, [str(i) for i in range(10)], "mnist", "train")
    run = train_cnn(ds, epochs=epochs, batch_size=16, log_every=1)
    steps = []
    try:
        while True:
            steps.append(next(run))
    except StopIteration as done:
        model = done.value
    assert steps and steps[-1].step == steps[-1].total_steps >= 1
    assert model is not None


def _perturbed(net, seed):
    import copy

    other = copy.deepcopy(net)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return other


def test_a_torn_card_and_weights_pair_is_refused_in_either_direction(tmp_path, tiny_net):
    card = {"dataset": "mnist", "classes": list("0123456789")}
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_net, card)
    old_card, old_weights = path.with_suffix(".json").read_bytes(), path.read_bytes()
    save_checkpoint(path, _perturbed(tiny_net, 1), card)
    new_card = path.with_suffix(".json").read_bytes()
    path.with_suffix(".json").write_bytes(old_card)  # new weights, the old card
    with pytest.raises(CheckpointError, match="written for other weights"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="written for other weights"):
        read_card(path)
    path.with_suffix(".json").write_bytes(new_card)
    path.write_bytes(old_weights)  # the new card, the old weights
    with pytest.raises(CheckpointError, match="delete m.json to use the card embedded"):
        load_checkpoint(path)
    path.with_suffix(".json").unlink()  # as the message says: the weights' own card
    assert load_checkpoint(path).card["tensors_sha256"] == json.loads(old_card)["tensors_sha256"]


def test_an_interruption_between_the_two_renames_is_detected_and_a_failed_write_keeps_the_old_pair(
        tmp_path, tiny_net, monkeypatch):
    import rdc_studio.core.models as models

    card = {"dataset": "mnist", "classes": list("0123456789")}
    path = save_checkpoint(tmp_path / "m.safetensors", tiny_net, card)
    x, s = torch.randn(1, 1, 28, 28), torch.ones(1)
    with torch.no_grad():
        before = tiny_net.denoise(x, s)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(models, "save_file", disk_full)
        with pytest.raises(OSError):
            save_checkpoint(path, _perturbed(tiny_net, 2), card)
    with torch.no_grad():  # the weights failed before anything was replaced: the old pair, whole
        assert torch.equal(load_checkpoint(path).net.denoise(x, s), before)

    publish = models.publish_file

    def killed_before_the_weights(tmp, target):
        if str(target).endswith(".safetensors"):
            raise KeyboardInterrupt
        publish(tmp, target)

    with monkeypatch.context() as m:
        m.setattr(models, "publish_file", killed_before_the_weights)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, _perturbed(tiny_net, 3), card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no .part left
    with pytest.raises(CheckpointError, match="written for other weights"):
        load_checkpoint(path)
    save_checkpoint(path, _perturbed(tiny_net, 3), card)  # saving again mends it
    load_checkpoint(path)


def test_the_pair_digest_is_deterministic_survives_card_updates_and_old_cards_without_it_load(tmp_path, tiny_net):
    card = {"name": "m", "dataset": "mnist", "classes": list("0123456789")}
    a = save_checkpoint(tmp_path / "a.safetensors", tiny_net, card)
    b = save_checkpoint(tmp_path / "b.safetensors", tiny_net, card)
    assert a.read_bytes() == b.read_bytes()  # same weights and card: the same file, as before the digest
    update_card_entries(a, {"metrics": {"val": 0.5}})
    assert load_checkpoint(a).card["metrics"] == {"val": 0.5}
    legacy = json.loads(a.with_suffix(".json").read_text())
    del legacy["tensors_sha256"]
    a.with_suffix(".json").write_text(json.dumps(legacy))
    assert load_checkpoint(a).card["metrics"] == {"val": 0.5}


def test_a_torn_cnn_pair_is_refused(tmp_path):
    from rdc_studio.core.baseline import SmallCNN, load_cnn, save_cnn

    torch.manual_seed(0)
    path = save_cnn(tmp_path / "c.safetensors", SmallCNN(1, 10, 28), {"dataset": "mnist"})
    old_card = path.with_suffix(".json").read_bytes()
    load_cnn(path)
    save_cnn(path, SmallCNN(1, 10, 28), {"dataset": "mnist"})
    path.with_suffix(".json").write_bytes(old_card)
    with pytest.raises(CheckpointError, match="written for other weights"):
        load_cnn(path)


def test_a_write_removes_what_killed_writers_of_the_same_file_left_and_nothing_else(tmp_path):
    """A writer killed mid-write (SIGKILL, power loss) cannot remove its temporary file; the
    next write of the same file does, once it is an hour old, and leaves every other file."""
    import os
    import time

    from rdc_studio.core.models import STALE_PART_SECONDS, atomic_write_bytes

    target = tmp_path / "m.safetensors"
    old = time.time() - STALE_PART_SECONDS - 60
    stale = [tmp_path / ".m.safetensors.k3j_x9a0.part", tmp_path / "m.safetensorsab12cd34.part"]  # new, older naming
    kept = [tmp_path / ".m.safetensors.fresh123.part",  # a write in progress: recent
            tmp_path / ".m.safetensors.bak.k3j_x9a0.part",  # another file's (m.safetensors.bak)
            tmp_path / ".m.safetensor.k3j_x9a0.part",  # another file's
            tmp_path / "notes.part"]
    for leftover in stale + kept:
        leftover.write_bytes(b"half written")
        if leftover.name != ".m.safetensors.fresh123.part":
            os.utime(leftover, (old, old))
    atomic_write_bytes(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name] + [p.name for p in kept])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    import os

    from rdc_studio.core.models import replacing_file

    target = tmp_path / "card.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="cancelled"):
        with replacing_file(target) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("cancelled")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["card.json"]
    with replacing_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["card.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() gives, not mkstemp's 0600

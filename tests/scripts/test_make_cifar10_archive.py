"""scripts/make_cifar10_archive.py turns the binary CIFAR-10 release into the archive that
load_cifar10 reads, pixel for pixel, and never leaves a partial output."""
import importlib.util
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rdc_studio.core.data import CIFAR10_CLASSES, load_cifar10

ROOT = Path(__file__).resolve().parents[2]
N_TRAIN, N_TEST = 20, 20  # tiny; every class occurs in both splits (ImageFolder refuses an empty class)
SMALL = ["--expect-counts", f"{N_TRAIN},{N_TEST}"]


@pytest.fixture
def script(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # never the real user data folder
    monkeypatch.setenv("RDC_CACHE_DIR", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("make_cifar10_archive", ROOT / "scripts" / "make_cifar10_archive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels holding every class (in shuffled order, some twice) and random RGB images."""
    labels = rng.permutation(np.concatenate([np.arange(10), rng.integers(0, 10, n - 10)])).astype(np.uint8)
    return labels, rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def records(labels: np.ndarray, images: np.ndarray) -> bytes:
    planes = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)  # R plane, G plane, B plane
    return np.concatenate([labels[:, None], planes], axis=1).tobytes()


def write_release(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def release(tmp_path):
    """A tiny cifar-10-binary.tar.gz: its files and the (labels, images) of each split."""
    rng = np.random.default_rng(0)
    train, test = fake_split(rng, N_TRAIN), fake_split(rng, N_TEST)
    per = N_TRAIN // 5
    files = {"batches.meta.txt": ("\n".join(CIFAR10_CLASSES) + "\n\n").encode()}
    for b in range(5):
        files[f"data_batch_{b + 1}.bin"] = records(train[0][b * per:(b + 1) * per], train[1][b * per:(b + 1) * per])
    files["test_batch.bin"] = records(*test)
    return files, {"train": train, "test": test}


def interleaved(labels: np.ndarray) -> np.ndarray:
    """The order load_cifar10 returns: the first of each class (class order), then the second..."""
    rank = [int((labels[:i] == y).sum()) for i, y in enumerate(labels)]
    return np.array(sorted(range(len(labels)), key=lambda i: (rank[i], labels[i])))


def error_of(script, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    message = str(exc.value.code)
    assert message.startswith("make_cifar10_archive: error: ") and "\n" not in message
    return message


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def test_archive_loads_back_the_exact_records(script, release, tmp_path, capsys):
    files, splits = release
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", files)
    data_root = tmp_path / "data"
    out = data_root / "cifar10-jpeg.tar.gz"
    assert script.main([str(source), "--out", str(out)] + SMALL) == 0
    assert f"wrote {N_TRAIN} train + {N_TEST} test images" in capsys.readouterr().out
    with tarfile.open(out) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    labels, _ = splits["test"]
    assert f"cifar10-jpeg/test/{CIFAR10_CLASSES[labels[3]]}/00003.png" in names
    assert len(names) == N_TRAIN + N_TEST and all(n.endswith(".png") for n in names)
    for split, source_split in (("test", "test"), ("train-full", "train")):
        labels, images = splits[source_split]
        ds = load_cifar10(split, data_root=data_root, cache_dir=tmp_path / "cache")
        order = interleaved(labels)
        assert ds.classes == CIFAR10_CLASSES
        assert ds.labels.tolist() == labels[order].tolist()
        assert np.array_equal(ds.images.numpy(), images[order].transpose(0, 3, 1, 2))  # lossless
    assert leftovers(data_root) == []


def test_same_input_gives_the_same_bytes(script, release, tmp_path):
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", release[0])
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    assert script.main([str(source), "--out", str(a)] + SMALL) == 0
    assert script.main([str(source), "--out", str(b)] + SMALL) == 0
    assert a.read_bytes() == b.read_bytes()


def test_default_output_is_the_user_data_folder(script, release, tmp_path):
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", release[0])
    assert script.main([str(source)] + SMALL) == 0
    out = tmp_path / "xdg" / "rdc-studio" / "data" / "cifar10-jpeg.tar.gz"
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert out.is_file() and out.stat().st_mode == plain.stat().st_mode  # not mkstemp's 0600


def test_truncated_batch_is_refused_and_nothing_is_written(script, release, tmp_path):
    files = dict(release[0])
    files["data_batch_3.bin"] = files["data_batch_3.bin"][:-1]
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", files)
    out = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    assert "data_batch_3.bin holds" in error_of(script, [str(source), "--out", str(out)] + SMALL)
    assert not out.exists()


def test_bad_label_midway_leaves_no_output(script, release, tmp_path):
    files = dict(release[0])
    test = bytearray(files["test_batch.bin"])
    test[5 * 3073] = 10  # found while converting, after the train split is written to the temp file
    files["test_batch.bin"] = bytes(test)
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", files)
    out = tmp_path / "cifar10-jpeg.tar.gz"
    assert "record 5 has label 10" in error_of(script, [str(source), "--out", str(out)] + SMALL)
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_is_kept_unless_forced_even_on_interrupt(script, release, tmp_path, monkeypatch):
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", release[0])
    out = tmp_path / "cifar10-jpeg.tar.gz"
    out.write_bytes(b"old")
    assert "already exists (pass --force" in error_of(script, [str(source), "--out", str(out)] + SMALL)
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt

    monkeypatch.setattr(script, "add_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        script.main([str(source), "--out", str(out), "--force"] + SMALL)
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []
    monkeypatch.undo()
    script.main([str(source), "--out", str(out), "--force"] + SMALL)
    assert tarfile.is_tarfile(out)


def test_unusable_inputs_are_one_line_errors(script, release, tmp_path):
    files, _ = release
    out = str(tmp_path / "out.tar.gz")
    assert "does not exist" in error_of(script, [str(tmp_path / "missing.tar.gz"), "--out", out])
    plain = tmp_path / "plain.tar.gz"
    plain.write_bytes(b"not an archive")
    assert "not a readable .tar.gz" in error_of(script, [str(plain), "--out", out])
    source = write_release(tmp_path / "cifar-10-binary.tar.gz", files)
    assert "is the input" in error_of(script, [str(source), "--out", str(source), "--force"])
    assert "expected 50000" in error_of(script, [str(source), "--out", out])  # the official counts by default
    no_test = write_release(tmp_path / "no-test.tar.gz", {k: v for k, v in files.items() if k != "test_batch.bin"})
    assert "no cifar-10-batches-bin/test_batch.bin" in error_of(script, [str(no_test), "--out", out] + SMALL)
    assert not Path(out).exists()

"""Safe import of EDM snapshots (``network-snapshot-*.pkl``, the published ``*.pkl``).

An EDM snapshot is a plain pickle of ``dict(ema=network, loss_fn=..., augment_pipe=...,
dataset_kwargs=...)`` whose objects are EDM "persistent" objects: each carries the
source code of its module and is rebuilt by ``torch_utils.persistence`` importing and
running that code. This module never does that. It reads the pickle with an
allow-list unpickler (:class:`SnapshotUnpickler`):

* an EDM persistent object becomes a :class:`PersistentRecord` (class name, constructor
  arguments, state); its embedded source is neither executed nor imported;
* tensors are rebuilt from their raw bytes (the legacy and zip ``torch.save`` layouts
  that pickled storages use), checked against their storage's size (no overlapping
  strides), with all decoded bytes together capped at a small multiple of the file's size;
* ``collections.OrderedDict``, torch's container modules (as records), sets and numeric
  numpy scalars are the only other globals it resolves; any other global
  (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) stops the load with an
  :class:`EdmImportError` naming the file and the global, before anything is called.

The network record is then converted into :class:`~.edm_nets.EdmDenoiser`, whose
parameter names are EDM's, so the state dict loads as it is. The configuration is bounded
and first built on the meta device, so a network is allocated only once its shapes match
the snapshot's tensors; any failure is an :class:`EdmImportError` (a ``CheckpointError``).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import io
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .edm_nets import (MODEL_DEFAULTS, MODEL_TYPES, PRECOND_CLASS_NAMES, PRECOND_DEFAULTS, EdmDenoiser,
                       EdmNetConfig)
from .models import (CheckpointError, LoadedModel, file_sha256, load_checkpoint, purifier_entry, read_card,
                     save_checkpoint)

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's legacy-format magic number
EDM_NETWORK_KEYS = ("ema", "G_ema", "network")  # where a snapshot keeps its network ('ema' in EDM)
# decoded storages and tensors may take at most this multiple of the file's size, plus the slack
# (a real snapshot takes about 2x: each storage, then its tensors' copies)
DECODE_FACTOR, DECODE_SLACK = 4, 16 * 2**20
# generous bounds on a declared network (EDM's largest published one: 64 px, 192 channels x 4, 1000 labels)
MAX_RESOLUTION, MAX_CHANNELS, MAX_LABELS, MAX_BLOCKS, MAX_LIST = 1024, 4096, 100_000, 64, 16


class EdmImportError(CheckpointError):
    """An EDM snapshot could not be imported; the message names the file and the problem."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle references a global that is not on the allow-list."""


# -- plain records for what the pickle describes --------------------------------------------

@dataclass
class PersistentRecord:
    """An EDM persistent object, as data: its class name, constructor arguments and state.

    ``source_sha256`` identifies the embedded module source (never executed).
    """

    class_name: str
    state: dict[str, Any]
    init_args: tuple = ()
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    version: Any = None
    source_sha256: str | None = None


class ModuleRecord:
    """A pickled torch container module (ModuleDict, ModuleList, Sequential), as data."""

    class_name = "Module"

    def __new__(cls, *args: Any, **kwargs: Any) -> "ModuleRecord":  # NEWOBJ: no constructor code runs
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0] or {}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for a {self.class_name}")
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"{self.class_name}Record({list(self.state.get('_modules', {}))})"


def _module_record(name: str) -> type:
    return type(f"{name}Record", (ModuleRecord,), {"class_name": name})


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access): a plain dict."""


@dataclass
class _Storage:
    dtype: torch.dtype
    data: torch.Tensor  # 1-D, owns its memory


class _Budget:
    """The bytes one snapshot's storages and tensors may decode to. Pickle memo references
    can hand one blob or storage to any number of calls, so each call is counted."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit

    def take(self, nbytes: int) -> None:
        if nbytes > self.left:
            raise pickle.UnpicklingError(f"its tensors decode to more than {self.limit} bytes "
                                         f"({DECODE_FACTOR}x the file's size + {DECODE_SLACK >> 20} MiB)")
        self.left -= nbytes


# -- tensors from pickled storages -------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _StorageUnpickler(pickle.Unpickler):
    """The pickles inside a saved storage: storage types and persistent ids only."""

    def __init__(self, f: Any, storages: Callable[[Any], Any] | None = None) -> None:
        super().__init__(f)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise pickle.UnpicklingError("unexpected persistent id in a pickled storage")
        return self._storages(pid)


def _storage_from_bytes(budget: _Budget, blob: bytes) -> _Storage:
    """A storage saved by ``torch.save`` (legacy or zip layout), read without torch.load."""
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError("a storage is not given as bytes")
    if blob[:2] == b"PK":
        return _storage_from_zip(bytes(blob), budget)
    return _storage_from_legacy(bytes(blob), budget)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _make_storage(dtype: torch.dtype, raw: bytes, numel: int) -> _Storage:
    itemsize = _itemsize(dtype)
    if len(raw) != numel * itemsize:
        raise pickle.UnpicklingError(f"storage holds {len(raw)} bytes, expected {numel * itemsize}")
    data = torch.frombuffer(bytearray(raw), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
    return _Storage(dtype, data)


def _storage_from_legacy(blob: bytes, budget: _Budget) -> _Storage:
    """torch.save's legacy layout: magic, protocol, system info, the object pickle, the
    storage keys, then per storage an int64 element count and the raw little-endian bytes."""
    f = io.BytesIO(blob)
    if _StorageUnpickler(f).load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("a pickled storage is not in torch.save's format")
    protocol = _StorageUnpickler(f).load()
    if protocol != 1001:
        raise pickle.UnpicklingError(f"unsupported torch.save protocol {protocol!r}")
    sys_info = _StorageUnpickler(f).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise pickle.UnpicklingError("big-endian storages are not supported")
    found: dict[str, tuple[_StorageType, int, Any]] = {}

    def storages(pid: Any) -> tuple:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError("unexpected persistent id in a pickled storage")
        view = pid[5] if len(pid) == 6 else None
        found[str(pid[2])] = (pid[1], int(pid[4]), view)
        return ("ref", str(pid[2]), view)

    ref = _StorageUnpickler(f, storages).load()
    keys = _StorageUnpickler(f).load()
    if not isinstance(keys, list) or set(map(str, keys)) != set(found):
        raise pickle.UnpicklingError("malformed storage key list")
    loaded: dict[str, _Storage] = {}
    for key in map(str, keys):
        stype, _numel, _ = found[key]
        header = f.read(8)
        if len(header) != 8:
            raise EOFError
        (count,) = struct.unpack("<q", header)
        itemsize = _itemsize(stype.dtype)
        if count < 0 or count * itemsize > len(blob):
            raise pickle.UnpicklingError("malformed storage size")
        budget.take(count * itemsize)
        raw = f.read(count * itemsize)
        if len(raw) != count * itemsize:
            raise EOFError
        loaded[key] = _make_storage(stype.dtype, raw, count)
    return _resolve_ref(ref, loaded)


def _resolve_ref(ref: Any, loaded: dict[str, _Storage]) -> _Storage:
    if not (isinstance(ref, tuple) and len(ref) == 3 and ref[0] == "ref" and ref[1] in loaded):
        raise pickle.UnpicklingError("a pickled storage does not hold one storage")
    storage = loaded[ref[1]]
    view = ref[2]
    if view is not None:  # (view key, offset, size)
        _, offset, size = view
        storage = _Storage(storage.dtype, storage.data[int(offset):int(offset) + int(size)].clone())
    return storage


def _storage_from_zip(blob: bytes, budget: _Budget) -> _Storage:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise pickle.UnpicklingError("a zipped storage has no data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        found: dict[str, tuple[_StorageType, int, Any]] = {}

        def storages(pid: Any) -> tuple:
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise pickle.UnpicklingError("unexpected persistent id in a pickled storage")
            found[str(pid[2])] = (pid[1], int(pid[4]), None)
            return ("ref", str(pid[2]), None)

        ref = _StorageUnpickler(io.BytesIO(z.read(pkl[0])), storages).load()
        loaded = {}
        for key, (stype, numel, _) in found.items():
            name, nbytes = f"{prefix}data/{key}", numel * _itemsize(stype.dtype)
            if name not in names or z.getinfo(name).file_size != nbytes:  # checked before decompressing
                raise pickle.UnpicklingError(f"a zipped storage's entry {name} does not hold its declared "
                                             f"{nbytes} bytes")
            budget.take(nbytes)
            loaded[key] = _make_storage(stype.dtype, z.read(name), numel)
    return _resolve_ref(ref, loaded)


def _rebuild_tensor(budget: _Budget, storage: Any, offset: Any, size: Any, stride: Any,
                    *rest: Any) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` from a checked storage (a copy, contiguous)."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor does not refer to a storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError("malformed tensor geometry")
    numel = math.prod(size)
    if numel == 0:
        return torch.empty(size, dtype=storage.dtype)
    if numel > storage.data.numel():
        raise pickle.UnpicklingError(f"a tensor of size {size} has {numel} elements, its storage "
                                     f"{storage.data.numel()}")
    # a saved network's tensors never overlap themselves: with the dimensions ordered by stride,
    # each stride must step over the whole extent of the smaller ones (this refuses zero strides)
    extent = 1
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s < extent:
            raise pickle.UnpicklingError(f"a tensor's strides {stride} overlap its elements (size {size})")
        extent = s * n
    if offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.data.numel():
        raise pickle.UnpicklingError("a tensor reaches past the end of its storage")
    budget.take(numel * storage.data.element_size())
    return torch.as_strided(storage.data, size, stride, offset).clone()


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, *rest: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter does not hold a tensor")
    return data


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dt = np.dtype(str(name))
    if dt.kind not in "biufc":
        raise pickle.UnpicklingError(f"numpy dtype {dt} is not numeric")
    return dt


def _numpy_scalar(dtype: Any, data: Any = b"") -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("only numeric numpy scalars are accepted")
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype)[0].item()


def _persistent_object(meta: Any) -> PersistentRecord:
    """``torch_utils.persistence._reconstruct_persistent_obj``: a record, no code run."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise pickle.UnpicklingError("malformed EDM persistent object")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise pickle.UnpicklingError(f"EDM persistent object {meta['class_name']} has no state")
    src = meta.get("module_src")
    digest = hashlib.sha256(src.encode()).hexdigest() if isinstance(src, str) else None
    args = state.get("_init_args", ())
    kwargs = state.get("_init_kwargs", {})
    return PersistentRecord(meta["class_name"], state, tuple(args) if isinstance(args, (tuple, list)) else (),
                            dict(kwargs) if isinstance(kwargs, dict) else {}, meta.get("version"), digest)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): _module_record("ModuleDict"),
    ("torch.nn.modules.container", "ModuleList"): _module_record("ModuleList"),
    ("torch.nn.modules.container", "Sequential"): _module_record("Sequential"),
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}


_BUDGETED = (_storage_from_bytes, _rebuild_tensor)  # take the unpickler's _Budget first


class SnapshotUnpickler(pickle.Unpickler):
    """Allow-list unpickler for EDM snapshots: resolves only the globals in ``_ALLOWED``;
    its storages and tensors decode to at most ``max_bytes``."""

    def __init__(self, f: Any, max_bytes: int) -> None:
        super().__init__(f)
        self.budget = _Budget(max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None
        return functools.partial(found, self.budget) if found in _BUDGETED else found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in EDM snapshots")


# -- reading and converting ----------------------------------------------------------------

def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


MAX_SNAPSHOT_BYTES = 4 << 30  # EDM's published snapshots are 0.2-0.6 GB


def read_snapshot(path: str | Path) -> Any:
    """Unpickle an EDM snapshot with the allow-list unpickler (records, tensors, plain data)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():  # a folder, or a pipe or device (which would be read forever)
            raise EdmImportError(f"{path}: not a regular file; give an EDM snapshot (.pkl)")
        if path.exists() and path.stat().st_size > MAX_SNAPSHOT_BYTES:
            raise EdmImportError(f"{path}: {path.stat().st_size} bytes is too large for an EDM snapshot (the "
                                 f"published ones are 0.2-0.6 GB; at most {MAX_SNAPSHOT_BYTES >> 30} GiB is read)")
        data = path.read_bytes()
    except OSError as exc:
        raise EdmImportError(f"{path}: cannot read the file ({_short(exc)})") from None
    except MemoryError:
        raise EdmImportError(f"{path}: not enough memory to read the file") from None
    if not data:
        raise EdmImportError(f"{path}: the file is empty, not an EDM snapshot")
    if data[:1] != b"\x80":
        kind = "a zip archive (torch.save?)" if data[:2] == b"PK" else "not a pickle"
        raise EdmImportError(f"{path}: {kind}; an EDM snapshot is a pickle (network-snapshot-*.pkl)")
    try:
        return SnapshotUnpickler(io.BytesIO(data), DECODE_FACTOR * len(data) + DECODE_SLACK).load()
    except RefusedGlobal as exc:
        raise EdmImportError(f"{path}: refused: the pickle references the global {exc}, which an EDM snapshot "
                             "does not contain; nothing in it was run") from None
    except EOFError:
        raise EdmImportError(f"{path}: truncated pickle (the file ends early; incomplete download?)") from None
    except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError,
            struct.error, zipfile.BadZipFile, MemoryError, RecursionError) as exc:
        if "truncated" in str(exc):
            raise EdmImportError(f"{path}: truncated pickle (the file ends early; incomplete download?)") from None
        raise EdmImportError(f"{path}: not a readable EDM snapshot ({_short(exc)})") from None


def find_network(snapshot: Any, path: str | Path) -> PersistentRecord:
    """The preconditioned network of a snapshot (its ``ema``), or a bare pickled network."""
    if isinstance(snapshot, PersistentRecord):
        net = snapshot
    elif isinstance(snapshot, dict):
        key = next((k for k in EDM_NETWORK_KEYS if k in snapshot), None)
        if key is None:
            keys = ", ".join(sorted(map(str, snapshot))) or "none"
            raise EdmImportError(f"{path}: the snapshot has no 'ema' network (keys: {keys})")
        net = snapshot[key]
        if not isinstance(net, PersistentRecord):
            raise EdmImportError(f"{path}: the snapshot's {key!r} entry is {type(net).__name__}, "
                                 "not an EDM network")
    else:
        raise EdmImportError(f"{path}: not an EDM snapshot: the pickle holds a {type(snapshot).__name__}, "
                             "not a dict with an 'ema' network")
    if net.class_name not in PRECOND_CLASS_NAMES:
        raise EdmImportError(f"{path}: unsupported EDM network class {net.class_name!r} "
                             f"(supported: {', '.join(PRECOND_CLASS_NAMES)})")
    return net


def _state_dict(record: Any, prefix: str = "", seen: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of a record tree, with torch's dotted names.

    A module met twice (a cycle, or one module under two names) is refused: EDM's networks
    are trees, and a pickle can describe a loop that would never end.
    """
    seen = set() if seen is None else seen
    seen.add(id(record))
    state = record.state
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{prefix}{name} is {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, ModuleRecord)):
            raise ValueError(f"submodule {prefix}{name} is {type(child).__name__}, not a module")
        if id(child) in seen:
            raise ValueError(f"submodule {prefix}{name} is a module already in the network (a cycle or a shared "
                             "module); an EDM network's modules form a tree")
        out.update(_state_dict(child, f"{prefix}{name}.", seen))
    return out


def _kwargs(record: PersistentRecord, what: str) -> dict[str, Any]:
    if record.init_args:
        raise ValueError(f"{what} was built with positional arguments; expected keyword arguments")
    return dict(record.init_kwargs)


def _check_limits(image_size: int, in_channels: int, label_dim: int, kwargs: dict) -> None:
    """Refuse a declared network far larger than any EDM network before anything is built
    (these bound the build's time; its memory is bounded by the check against the tensors)."""
    for name, value, limit in (("img_resolution", image_size, MAX_RESOLUTION), ("label_dim", label_dim, MAX_LABELS),
                               ("in_channels", in_channels, MAX_CHANNELS),
                               ("num_blocks", kwargs.get("num_blocks", 0), MAX_BLOCKS)):
        if isinstance(value, (int, float)) and value > limit:
            raise ValueError(f"{name} {value} exceeds {limit}")
    for name, value in kwargs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if len(values) > MAX_LIST:
            raise ValueError(f"{name} has {len(values)} entries, more than {MAX_LIST}")
        if any(isinstance(v, (int, float)) and abs(v) > MAX_CHANNELS for v in values):
            raise ValueError(f"{name} {value} exceeds {MAX_CHANNELS}")


def network_config(net: PersistentRecord) -> EdmNetConfig:
    """The :class:`EdmNetConfig` of a preconditioned EDM network record."""
    kind = PRECOND_CLASS_NAMES[net.class_name]
    pk = _kwargs(net, net.class_name)
    model = (net.state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord):
        raise ValueError(f"{net.class_name} has no 'model' submodule")
    if model.class_name not in MODEL_TYPES:
        raise ValueError(f"unsupported network type {model.class_name!r} (supported: {', '.join(MODEL_TYPES)})")
    mk = _kwargs(model, model.class_name)
    image_size = int(mk.pop("img_resolution", net.state.get("img_resolution")))
    in_channels = int(mk.pop("in_channels", net.state.get("img_channels")))
    out_channels = int(mk.pop("out_channels", in_channels))
    if out_channels != in_channels:
        raise ValueError(f"out_channels {out_channels} differs from in_channels {in_channels}")
    label_dim = int(mk.pop("label_dim", net.state.get("label_dim", 0)))
    unknown = sorted(set(mk) - set(MODEL_DEFAULTS[model.class_name]))
    if unknown:
        raise ValueError(f"unsupported {model.class_name} arguments {unknown}")
    _check_limits(image_size, in_channels, label_dim, mk)
    precond_kwargs = {k: float(net.state.get(k, pk.get(k, v))) for k, v in PRECOND_DEFAULTS[kind].items()}
    return EdmNetConfig(precond=kind, model_type=model.class_name, image_size=image_size, in_channels=in_channels,
                        num_classes=label_dim, model_kwargs=mk, precond_kwargs=precond_kwargs,
                        use_fp16=bool(net.state.get("use_fp16", pk.get("use_fp16", False))))


def _sha256(path: Path) -> str:
    return file_sha256(path)


def _plain(value: Any, depth: int = 0) -> Any:
    """JSON-safe copy of small plain data (for the card's record of the snapshot)."""
    if depth > 4:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value if not isinstance(value, float) or np.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value[:32]]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in list(value.items())[:64]}
    return repr(type(value).__name__)


def _guess_dataset(config: EdmNetConfig, snapshot: Any, path: Path) -> str | None:
    hints = [path.name]
    if isinstance(snapshot, dict) and isinstance(snapshot.get("dataset_kwargs"), dict):
        hints.append(str(snapshot["dataset_kwargs"].get("path", "")))
    if config.image_size == 32 and config.in_channels == 3 and any("cifar10" in h.lower() for h in hints):
        return "cifar10"
    return None


def convert(path: str | Path) -> tuple[EdmDenoiser, dict[str, Any]]:
    """Read an EDM snapshot safely and build the network and its model card (in memory).

    Any failure, running out of memory included, is an :class:`EdmImportError`.
    """
    path = Path(path)
    snapshot = read_snapshot(path)
    record = find_network(snapshot, path)
    try:
        return _convert(path, snapshot, record)
    except EdmImportError:
        raise
    # what malformed records, or a network too large for this machine, raise (RecursionError
    # is a RuntimeError); any of them is a refusal of the file, not a crash of the caller
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RuntimeError,
            MemoryError) as exc:
        raise EdmImportError(f"{path}: cannot convert the {record.class_name} network ({_short(exc)})") from None


def _convert(path: Path, snapshot: Any, record: PersistentRecord) -> tuple[EdmDenoiser, dict[str, Any]]:
    config = network_config(record)
    tensors = _state_dict(record)
    with torch.device("meta"):  # shapes only: nothing is allocated until they match the tensors
        expected = EdmDenoiser(config).state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise EdmImportError(f"{path}: the network's tensors do not match its configuration: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise EdmImportError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                 f"the configuration expects {tuple(ref.shape)}")
        if not tensors[key].is_floating_point() or not torch.isfinite(tensors[key]).all():
            raise EdmImportError(f"{path}: tensor {key!r} is not finite floating point")
    net = EdmDenoiser(config)
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)

    dataset = _guess_dataset(config, snapshot, path)
    k = config.num_classes
    classes = CIFAR10_CLASSES if (k == 10 and dataset == "cifar10") else [str(i) for i in range(k)]
    model = record.state.get("_modules", {}).get("model")
    card: dict[str, Any] = {
        "name": path.stem,
        "description": f"EDM {record.class_name} / {config.model_type} network imported from {path.name}"
                       + ("" if k else " (unconditional: no class heads)"),
        "dataset": dataset,
        "classes": classes,
        "image_size": config.image_size,
        "channels": config.in_channels,
        "normalization": "pixels in [0,1], network input 2x-1 (EDM's [-1, 1])",
        "parameters": sum(p.numel() for p in net.parameters()),
        "source": {
            "kind": "edm-snapshot", "file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size,
            "network_key": next((key for key in EDM_NETWORK_KEYS if isinstance(snapshot, dict) and key in snapshot),
                                None),
            "precond_class": record.class_name, "model_class": model.class_name,
            "edm_persistence_version": _plain(record.version),
            "module_source_sha256": record.source_sha256,
            "dataset_kwargs": _plain(snapshot.get("dataset_kwargs")) if isinstance(snapshot, dict) else None,
            "note": "read with an allow-list unpickler; the snapshot's embedded source code was not run",
        },
        "preconditioning": {"kind": config.precond, "class": record.class_name, **config.to_dict()["precond_kwargs"],
                            "sigma_min": net.sigma_min if np.isfinite(net.sigma_min) else str(net.sigma_min),
                            "sigma_max": net.sigma_max if np.isfinite(net.sigma_max) else str(net.sigma_max)},
        "network": {"model_type": config.model_type, "label_dim": k, **config.full_model_kwargs()},
        "unconditional_head": ("the unconditional network" if k == 0 else
                               "the all-zero label (EDM's default without a label; a conditional EDM model "
                               "trained without label dropout has not learnt it)"),
    }
    return net, card


def load_edm_pickle(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """An EDM snapshot as a :class:`~.models.LoadedModel`, converted in memory."""
    net, card = convert(path)
    card["net"] = net.config.to_dict()
    net.to(device)
    return LoadedModel(net, card, Path(path))


def output_path(source: str | Path, out: str | Path) -> Path:
    """Where ``rdc import-edm SOURCE --out OUT`` writes the weights: ``DIR/STEM.safetensors``
    when OUT is an existing folder or ends with a path separator, else OUT with the
    ``.safetensors`` suffix (the card goes beside it as ``.json``)."""
    target = Path(out)
    if target.is_dir() or str(out).endswith(("/", os.sep)):
        return target / f"{Path(source).stem}.safetensors"
    if target.suffix in (".safetensors", ".json"):
        return target.with_suffix(".safetensors")
    return target.with_name(target.name + ".safetensors")


def _check_preset(preset: str | None) -> None:
    if preset:
        from .presets import get_preset

        try:
            get_preset(preset)
        except ValueError as exc:
            raise EdmImportError(str(exc)) from None


def _purifier_weights(purifier: str | Path, dest: Path, net: EdmDenoiser, command: str | None) -> Path:
    """The purifier's weights file: an EDM snapshot is converted beside ``dest`` (the
    classifier's output), named after it or, where that is ``dest`` itself,
    ``STEM-purifier.safetensors``; a checkpoint is used where it is. Checks that it takes
    the classifier's images."""
    purifier = Path(purifier)
    if purifier.suffix.lower() == ".pkl":
        p_net, p_card = convert(purifier)
        weights = dest.parent / f"{purifier.stem}.safetensors"
        if weights.resolve() == dest.resolve():  # EDM names every run's snapshots alike
            weights = dest.parent / f"{purifier.stem}-purifier.safetensors"
        p_card["name"] = weights.stem
        p_card["role"] = "purifier"
        if command:
            p_card["import_command"] = command
        p_cfg = p_net.config
        if weights.exists() or weights.with_suffix(".json").exists():
            if not _is_conversion_of(weights, p_card["source"]["sha256"]):
                raise EdmImportError(f"{weights}: exists and is not a conversion of {purifier.name}, and the purifier "
                                     f"would be written there; move it away, or convert the purifier on its own "
                                     f"(rdc import-edm {purifier} --out FILE) and give FILE as --purifier")
            p_net = None  # the same snapshot's conversion: kept as it is (another card may name it by sha256)
    else:
        p_net = None  # used where it is
        loaded = load_checkpoint(purifier)
        weights, p_cfg = loaded.path, loaded.net.config
        if loaded.purifier is not None:
            raise EdmImportError(f"{purifier}: names a purifier of its own; a purifier must be a single model")
        if weights.resolve() == dest.resolve():
            raise EdmImportError(f"{dest}: the output would overwrite the purifier {purifier}; choose another --out")
    cfg = net.config
    if getattr(p_cfg, "num_classes", 0):  # EDM's conditional networks have no unconditional (null-label) output
        raise EdmImportError(f"{purifier}: a class-conditional network; the purifier must be an unconditional "
                             f"model (the paper's pair: a conditional classifier, an unconditional purifier)")
    if (p_cfg.image_size, p_cfg.in_channels) != (cfg.image_size, cfg.in_channels):
        raise EdmImportError(f"{purifier}: the purifier takes {p_cfg.in_channels}x{p_cfg.image_size}x"
                             f"{p_cfg.image_size} images, the classifier {cfg.in_channels}x{cfg.image_size}x"
                             f"{cfg.image_size}")
    if p_net is not None:
        save_checkpoint(weights, p_net, p_card)
    return weights


def _is_conversion_of(weights: Path, snapshot_sha256: str) -> bool:
    """Whether ``weights`` is a readable checkpoint converted from the snapshot of that sha256."""
    try:
        card = read_card(weights)
    except CheckpointError:
        return False
    source = card.get("source")
    return isinstance(source, dict) and source.get("kind") == "edm-snapshot" and source.get("sha256") == snapshot_sha256


def import_edm(source: str | Path, out: str | Path, command: str | None = None,
               purifier: str | Path | None = None, preset: str | None = None) -> Path:
    """Convert an EDM snapshot into the project's checkpoint format; returns the weights path.

    Parameters
    ----------
    source
        The EDM snapshot (``.pkl``) of the classifier.
    out
        Output checkpoint path or folder (see :func:`output_path`).
    purifier
        Optional: the model whose unconditional denoiser purifies (the paper's
        unconditional EDM snapshot). A ``.pkl`` is converted and written beside the
        output, named after the snapshot (``STEM.safetensors``), or ``STEM-purifier.safetensors``
        where that is the output itself (e.g. ``runA/`` and ``runB/network-snapshot-200000.pkl``
        into one folder); a file already there is kept when it is the same snapshot's
        conversion (another card may name it by sha256) and refused otherwise; a checkpoint
        is referenced where it is (and an output that would overwrite it is refused). The
        card then names it (path relative to the card, sha256), so the pair loads as one
        model: the classifier classifies, the purifier's network purifies. No file is written before both networks are converted and checked.
    preset
        Optional: a preset name (:mod:`core.presets`) recorded as the card's default.
    """
    _check_preset(preset)
    net, card = convert(source)
    dest = output_path(source, out)
    card["name"] = dest.stem
    if command:
        card["import_command"] = command
    if preset:
        card["preset"] = preset
    if purifier is not None:
        if not card["classes"]:
            raise EdmImportError(f"{source}: an unconditional network cannot classify; give the class-conditional "
                                 "snapshot first and the unconditional one as --purifier")
        dest.parent.mkdir(parents=True, exist_ok=True)
        card["purifier"] = purifier_entry(dest, _purifier_weights(purifier, dest, net, command))
    return save_checkpoint(dest, net, card)


def random_published_network(name: str, seed: int = 0) -> EdmDenoiser:
    """A full-size network of one of EDM's published configurations (e.g.
    ``cifar10-32x32-cond-vp``) with random weights, in eval mode, without gradients.

    EDM initialises its output layers to zero (so D = c_skip x and every class would give
    the same output); those are drawn (Xavier uniform) too, so the class heads differ.
    """
    from .edm_nets import published_config

    config = published_config(name)
    torch.manual_seed(seed)
    net = EdmDenoiser(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.xavier_uniform_(p)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def save_random_published(name: str, out: str | Path, seed: int = 0, purifier: str | None = None) -> Path:
    """A full-size network of a published EDM configuration with random weights, saved as a
    checkpoint: for end-to-end and speed checks where the real weights are not at hand.

    The card says plainly that the weights are random (``source.kind = 'random-weights'``).
    ``purifier`` (another published configuration, e.g. ``cifar10-32x32-uncond-vp``) also
    writes that network, with random weights (seed + 1), beside the output and names it
    as the purifier, giving a classifier + purifier pair like the paper's.
    """
    dest = output_path(f"{name}.pkl", out)
    net = random_published_network(name, seed)
    config = net.config
    k = config.num_classes
    card = {
        "name": dest.stem,
        "description": f"RANDOM WEIGHTS in EDM's published {name} configuration (not a trained model)",
        "dataset": "cifar10", "classes": CIFAR10_CLASSES[:k] if k else [], "image_size": config.image_size,
        "channels": config.in_channels, "normalization": "pixels in [0,1], network input 2x-1 (EDM's [-1, 1])",
        "parameters": sum(p.numel() for p in net.parameters()),
        "source": {"kind": "random-weights", "configuration": name, "seed": seed},
    }
    if purifier is not None:
        p_path = save_random_published(purifier, dest.parent / f"{dest.stem}-purifier.safetensors", seed + 1)
        card["purifier"] = purifier_entry(dest, p_path)
    return save_checkpoint(dest, net, card)

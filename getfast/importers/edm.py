"""NVlabs/edm network pickles as getfast teachers, read without running any code from the file.

EDM writes ``network-snapshot-*.pkl`` with plain ``pickle.dump({'ema': net, 'loss_fn': ..., 'augment_pipe': ...,
'dataset_kwargs': ...})``. Every network module is an instance of a class wrapped by EDM's
``torch_utils.persistence.persistent_class``, which pickles as a call ``_reconstruct_persistent_obj(meta)``
where ``meta`` holds the defining module's *source code*, the class name, and the instance ``__dict__``
(parameters, buffers, submodules, plain attributes, and the constructor's ``_init_args``/``_init_kwargs``).
Tensors inside are ordinary torch pickles (``_rebuild_tensor_v2`` over storages serialised with
``torch.save`` into bytes); numeric hyper-parameters may be NumPy scalars.

Unpickling such a file normally *executes the embedded source*. Here a restricted unpickler admits only the
few globals this format uses, turns each persistent object into an inert :class:`PersistentRecord`
(the source text is dropped unread), and refuses anything else with :class:`UnsafePickleError`. The
constructor arguments then build getfast's own modules (``getfast.models.edm_unets`` backbones under
``EDMPrecond``/``VPPrecond``/``VEPrecond``), whose structure and recorded hyper-parameters are checked
against the pickle before the weights are loaded strictly.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = "edm-pickle"

# EDM's preconditioners, their positional-argument order and their default backbone.
_PRECOND_ARGS = {
    "EDMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
                   "model_type"),
    "VPPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "beta_d", "beta_min", "M", "epsilon_t",
                  "model_type"),
    "VEPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "model_type"),
    "iDDPMPrecond": ("img_resolution", "img_channels", "label_dim", "use_fp16", "C_1", "C_2", "M", "model_type"),
}
_PRECOND_DEFAULTS = {
    "EDMPrecond": dict(label_dim=0, use_fp16=False, sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5,
                       model_type="DhariwalUNet"),
    "VPPrecond": dict(label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5,
                      model_type="SongUNet"),
    "VEPrecond": dict(label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100.0, model_type="SongUNet"),
    "iDDPMPrecond": dict(label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000, model_type="DhariwalUNet"),
}
# The preconditioner's own arguments, kept in meta["precond"] (img_* and label_dim go elsewhere).
_PRECOND_PARAMS = {"EDMPrecond": ("sigma_min", "sigma_max", "sigma_data"),
                   "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
                   "VEPrecond": ("sigma_min", "sigma_max"),
                   "iDDPMPrecond": ("C_1", "C_2", "M")}

# EDM class name -> the getfast module type built for it (checked node by node).
_CLASS_MAP = {
    "Conv2d": "EDMConv2d", "Linear": "EDMLinear", "GroupNorm": "GroupNorm", "UNetBlock": "EDMUNetBlock",
    "PositionalEmbedding": "PositionalEmbedding", "FourierEmbedding": "FourierEmbedding",
    "SongUNet": "SongUNet", "DhariwalUNet": "DhariwalUNet", "ModuleDict": "ModuleDict",
    "EDMPrecond": "EDMPrecond", "VPPrecond": "VPPrecond", "VEPrecond": "VEPrecond", "iDDPMPrecond": "IDDPMPrecond",
}
# Hyper-parameters an EDM module stores as attributes; where both sides have one they must agree.
_CHECKED_ATTRS = ("in_channels", "out_channels", "in_features", "out_features", "up", "down", "fused_resample",
                  "num_groups", "eps", "num_heads", "skip_scale", "adaptive_scale", "dropout", "num_channels",
                  "max_positions", "endpoint", "label_dropout", "img_resolution", "img_channels", "sigma_data",
                  "sigma_min", "sigma_max", "beta_d", "beta_min", "M", "epsilon_t", "C_1", "C_2")


class UnsafePickleError(ValueError):
    """The pickle asks for something outside the EDM network format; nothing from it was executed."""


class PersistentRecord:
    """An EDM persistent object, reduced to data: its class name and its instance state (a dict)."""

    __slots__ = ("class_name", "state", "version")

    def __init__(self, class_name: str, state: dict, version):
        self.class_name, self.state, self.version = class_name, state, version

    def __repr__(self):
        return f"PersistentRecord({self.class_name})"


class _ContainerRecord:
    """A torch container module (ModuleDict/ModuleList/Sequential) pickled by reference: its state only."""

    class_name = "?"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state for a torch {self.class_name}: {type(state).__name__}")
        self.state = state


def _container(name: str) -> type:
    return type(f"_{name}Record", (_ContainerRecord,), {"class_name": name})


_CONTAINERS = {n: _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")}


class _EasyDictRecord(dict):
    """dnnlib.util.EasyDict (a dict subclass) read as a plain dict."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


def _reconstruct_persistent_obj(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str) \
            or not isinstance(meta.get("state"), dict):
        raise UnsafePickleError("malformed torch_utils.persistence record (expected type='class', class_name, state)")
    # meta['module_src'] (the pickled source code) is deliberately ignored: it is never compiled or run.
    return PersistentRecord(meta["class_name"], dict(meta["state"]), meta.get("version"))


def _load_from_bytes(b):
    if not isinstance(b, (bytes, bytearray)):
        raise UnsafePickleError("a serialised tensor storage is not a bytes object")
    return torch.load(io.BytesIO(bytes(b)), map_location="cpu", weights_only=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise UnsafePickleError(f"tensor storage of unexpected type {type(storage).__name__}")
    if not (isinstance(storage_offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise UnsafePickleError("tensor geometry must be integers")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False,
                                           collections.OrderedDict())


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("a parameter's data is not a tensor")
    return data  # weights only: requires_grad, hooks and Python attributes of the Parameter are dropped


_NUMERIC_DTYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "bool", "int8", "int16",
                   "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}


def _np_dtype(name, align=False, copy=True):
    if not isinstance(name, str) or name not in _NUMERIC_DTYPES:
        raise UnsafePickleError(f"NumPy dtype {name!r} is not a plain numeric type")
    return np.dtype(name)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes) \
            or len(data) != dtype.itemsize:
        raise UnsafePickleError("malformed NumPy scalar")
    return np.frombuffer(data, dtype=dtype)[0].item()  # a Python bool/int/float


def _reconstructor(cls, base, state=None):
    # copyreg._reconstructor, used by protocol 0/1 pickles for plain classes: allowed for containers only.
    if not (isinstance(cls, type) and issubclass(cls, (_ContainerRecord, _EasyDictRecord))) or base is not object:
        raise UnsafePickleError("copyreg._reconstructor is only accepted for torch containers")
    return cls.__new__(cls)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol 0-2 pickles spell bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only accepted for latin-1 byte strings")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _codecs_encode,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("dnnlib.util", "EasyDict"): _EasyDictRecord,
    ("dnnlib", "EasyDict"): _EasyDictRecord,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch.nn.modules.container", n): c for n, c in _CONTAINERS.items()},
}


# Python 2 spellings that protocol 0-2 pickles carry.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load '{module}.{name}': only NVlabs/edm network pickles are read, and code named "
                "in a pickle is never run") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("persistent ids are not part of the EDM pickle format")


def read_pickle(path) -> object:
    """Unpickle an EDM file with the restricted unpickler: persistent objects become ``PersistentRecord``s."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f).load()
        except UnsafePickleError as e:
            raise UnsafePickleError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError, KeyError,
                RuntimeError) as e:
            raise ValueError(f"{path}: not a readable EDM pickle ({type(e).__name__}: {e})") from e


def _network_record(obj, path, key: str):
    if isinstance(obj, dict):
        if key not in obj:
            raise ValueError(f"{path}: no {key!r} entry; the pickle holds {sorted(map(str, obj))}")
        obj = obj[key]
    if not isinstance(obj, PersistentRecord):
        raise ValueError(f"{path}: {key!r} is not an EDM network (got {type(obj).__name__})")
    if obj.class_name not in _PRECOND_ARGS:
        raise ValueError(f"{path}: unsupported network class {obj.class_name!r}; supported: "
                         f"{', '.join(_PRECOND_ARGS)} (over SongUNet or DhariwalUNet)")
    return obj


def _init_kwargs(rec: PersistentRecord, order: tuple, path) -> dict:
    args, kwargs = rec.state.get("_init_args"), rec.state.get("_init_kwargs")
    if kwargs is None or args is None:
        raise ValueError(f"{path}: the {rec.class_name} object does not record its constructor arguments")
    if len(args) > len(order):
        raise ValueError(f"{path}: {rec.class_name} was built with {len(args)} positional arguments; at most "
                         f"{len(order)} are known")
    out = dict(zip(order, args))
    for k, v in dict(kwargs).items():
        if k in out:
            raise ValueError(f"{path}: {rec.class_name} argument {k!r} given twice")
        out[k] = v
    return out


def _plain(v):
    """JSON-safe copy of a constructor argument (tuples/lists -> lists, NumPy/torch scalars -> Python)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def meta_from_record(rec: PersistentRecord, path="<pickle>") -> dict:
    """getfast teacher metadata (see ``getfast.teacher``) from an EDM preconditioner record."""
    from getfast.models.edm_unets import ARCHITECTURES
    kind = rec.class_name
    kw = {**_PRECOND_DEFAULTS[kind], **_init_kwargs(rec, _PRECOND_ARGS[kind], path)}
    for req in ("img_resolution", "img_channels"):
        if req not in kw:
            raise ValueError(f"{path}: {kind} does not record {req!r}")
    arch = kw.pop("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: unsupported backbone {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    precond = {"type": kind, **{k: _plain(kw.pop(k)) for k in _PRECOND_PARAMS[kind]}}
    res, ch, label_dim, use_fp16 = (kw.pop(k) for k in ("img_resolution", "img_channels", "label_dim", "use_fp16"))
    overrides = {k: _plain(v) for k, v in kw.items()}
    # A VP/VE/iDDPM teacher's model name is deliberately not a registered backbone: code that rebuilds a
    # teacher from the name alone (as an EDMPrecond) must fail loudly rather than get the wrong preconditioning.
    model = f"EDM-{arch}" if kind == "EDMPrecond" else f"EDM-{arch}/{kind}"
    return {"model": model, "resolution": int(res), "channels": int(ch), "num_classes": int(label_dim),
            "label_dropout": float(overrides.get("label_dropout", 0.0)), "data": None, "overrides": overrides,
            "precond": precond, "use_fp16": bool(use_fp16), "source": {"format": FORMAT}}


def build_from_meta(meta: dict) -> nn.Module:
    """The getfast denoiser (preconditioner over an EDM backbone) that ``meta`` describes, with fresh weights."""
    from getfast.diffusion.vp_ve import PRECONDITIONERS
    from getfast.models.edm_unets import build
    p = dict(meta["precond"])
    kind = p.pop("type")
    if kind not in PRECONDITIONERS:
        raise ValueError(f"precond: unknown preconditioning {kind!r}; known: {', '.join(PRECONDITIONERS)}")
    extra = {"out_channels": 2 * meta["channels"]} if kind == "iDDPMPrecond" else {}  # + learned variance
    try:
        backbone = build(meta["model"].split("/")[0], meta["resolution"], meta["channels"], meta["num_classes"],
                         **meta["overrides"], **extra)
    except TypeError as e:
        raise ValueError(f"EDM backbone arguments not understood ({e})") from e
    if kind == "EDMPrecond":
        net = PRECONDITIONERS[kind](backbone, sigma_data=p["sigma_data"])
        net.sigma_min, net.sigma_max = p["sigma_min"], p["sigma_max"]
    else:
        net = PRECONDITIONERS[kind](backbone, **p)
    return net


def _node_children(node) -> dict:
    mods = node.state.get("_modules") or {}
    return {k: v for k, v in mods.items() if v is not None}


def _check_structure(node, module: nn.Module, where: str, path) -> None:
    """Walk the pickle's module tree beside the built one: same class at every node, same children, and the
    same recorded hyper-parameters. This catches a checkpoint from a modified EDM before any weight loads."""
    name = getattr(node, "class_name", "?")
    want = _CLASS_MAP.get(name)
    if want is None or type(module).__name__ != want:
        raise ValueError(f"{path}: at '{where or '<root>'}' the pickle has a {name}, getfast built a "
                         f"{type(module).__name__}")
    state = node.state
    for attr in _CHECKED_ATTRS:
        if attr in state and hasattr(module, attr):
            a, b = _plain(state[attr]), getattr(module, attr)
            same = (math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) or (math.isinf(a) and a == b)) \
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) else a == b
            if not same:
                raise ValueError(f"{path}: '{where}.{attr}' is {a!r} in the pickle but {b!r} in the getfast model; "
                                 "the checkpoint is not from the EDM architecture this importer implements")
    mine = dict(module.named_children())
    theirs = _node_children(node)
    if not where and "model" in theirs:  # EDM's preconditioners call their backbone "model", getfast "backbone"
        theirs["backbone"] = theirs.pop("model")
    if set(mine) != set(theirs):
        raise ValueError(f"{path}: at '{where or '<root>'}' the pickle has submodules {sorted(theirs)} but getfast "
                         f"built {sorted(mine)}")
    for k, child in theirs.items():
        if not isinstance(child, (PersistentRecord, _ContainerRecord)):
            raise ValueError(f"{path}: '{where}.{k}' is not a module record")
        _check_structure(child, mine[k], f"{where}.{k}" if where else k, path)


def _state_dict(node, prefix: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    st = node.state
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for k, v in (st.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v
    for k, v in (st.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[prefix + k] = v
    for k, child in _node_children(node).items():
        _state_dict(child, f"{prefix}{k}.", out)
    return out


def denoiser_from_record(rec: PersistentRecord, path="<pickle>") -> nn.Module:
    """Build and fill the getfast denoiser for an EDM preconditioner record; ``.meta`` is attached."""
    meta = meta_from_record(rec, path)
    net = build_from_meta(meta)
    _check_structure(rec, net, "", path)
    state = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v
             for k, v in _state_dict(rec).items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: '{k}' is not a tensor")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the architecture the pickle describes ({e})") from e
    net.meta = meta
    return net.eval().requires_grad_(False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_edm_pickle(path, device="cpu", key: str = "ema") -> nn.Module:
    """A teacher denoiser D(x; σ, class_labels) from an NVlabs/edm pickle (Karras et al. 2022): ``{'ema': net}``
    training snapshots (``key`` picks another entry) or a bare pickled network. Nothing in the file is executed.
    Labels may be integers (−1 = none), one-hot rows, or None; augmentation labels are zero (off)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no EDM pickle at {path}")
    rec = _network_record(read_pickle(path), path, key)
    net = denoiser_from_record(rec, path)
    net.meta["source"].update(file=path.name, sha256=_sha256(path), key=key)
    return net.to(device)

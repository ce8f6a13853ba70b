"""Exported weights: the ``.safetensors`` products a user shares (teachers, students, converted teachers).

Every product is written by :func:`weights_bytes` with a sha256 over its tensors (the header's names, dtypes,
shapes and offsets, and every byte of the data section) in the metadata key ``getfast_sha256``, and read by
:func:`read_weights`, which recomputes it: a flipped bit is an error naming the file, never a model that
silently differs from the one that was trained. Files written before the checksum existed carry none; the
ones committed in ``getfast/assets`` are checked against the digests in ``LEGACY`` (found by their metadata,
which a damaged weight byte leaves intact), other old files load unchecked.

The JSON in the metadata is checked before anything is built from it (:func:`json_metadata`,
:func:`check_arch`, :func:`check_student_meta`): a wrong type or a missing field is a ``ValueError`` naming
the file and the field, and weights that do not fit the network the metadata describes are one line
(:func:`load_state`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from getfast.limits import MAX_CLASSES, MAX_RESOLUTION

__all__ = ["CHECKSUM_KEY", "weights_bytes", "read_weights", "json_metadata", "check_arch", "check_student_meta",
           "load_state", "weights_digest"]

CHECKSUM_KEY = "getfast_sha256"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header

# Files committed before exports carried a checksum: sha256 of their metadata (sorted JSON) -> weights_digest.
LEGACY = {
    "21458635d2aa62498d4a07e1f8e2391044795d61969d7cbb899069e7c48f5a78":
        "0c8461733c499e8032caa52b1a5ad61dabf05aee43c01f250aade2953150eb14",  # students/gdd-fashion-mnist.safetensors
    "c2bd64935505b4628d99a415c011cbb2ec17260d7409c5b50b95f706b14e5a6f":
        "c8dbf024bdcdfc11d05616becf878b992994928fdb95782935dddc5d40f6a084",  # students/gddi-fashion-mnist.safetensors
    "0bd7561051e74a40903269f314147894bc161c846649d8d4c3665194ea7db804":
        "c519204e890882cdc4d10f9b160ed4f8d1f5efc14996f4578152aee78eacd2cb",  # students/get-n2-fashion-mnist.safetensors
    "ef7bdc2107352919d1b232ecb03beb4f849b987be3e7b7236e223519235dcf88":
        "8a9aceca5d10bfeb10d6dae2026830e91c7bf1aef40ef6028490a19a1f717063",  # students/get-n4-fashion-mnist.safetensors
    "30fd7baeb697c52bb4cc3fe78d0638f284a6fed2554f733074e2453a76669575":
        "f2a43d56974c90ea69ea46f2bbacf57b54fa90d36ad9e61b6c16c843526d519f",  # students/guided-1-fashion-mnist.safetensors
    "dc400228f79637d019219ee6820fae1493e2ee31fd20a03ad1e304ac91b50a5f":
        "a2e42df88f2d8d1c731a9b3bee258e81093c3d5dd015aef2000a3f76d8b43929",  # students/guided-2-fashion-mnist.safetensors
    "1b429733c1c9c72a294420d83cfe8e34ffd2e8191f337a8a4ee279a5c1836d47":
        "74f66e337cba3554548371f3c0e00d18e189ddef8d2d2ecdc4ec44319a94faf7",  # students/guided-4-fashion-mnist.safetensors
    "8539c8a0b9626706c98d4ba1ed4eb3b2095da0a6d2bab8cbb58ac9b2e45d37fe":
        "2f95f6b961176e704e0826f46b47fd367df615c016b8fe27f7840f703d0e5910",  # students/sim-fashion-mnist.safetensors
    "92111e0d2cdb6410d1483c283869b44e3c03dc93c6827e87d345115ff9a2381e":
        "7e8c8fdfacf6bfdb4ea73a48ceb07734350adc491a917bc90f7e762873bf9d38",  # students/vit-n4-fashion-mnist.safetensors
    "0a0ed3a704c99129af2e063a23ff444c63ed0f16061a075be11c3c61d18868d2":
        "dfd9d7e31f900815ece970b76aa3846d7a4178e43e0ed63f1199af34ffc2e3c2",  # students/vit-n5x-2-fashion-mnist.safetensors
    "fcf04a81ae413cae325d59d67f35129dd8f6e5f5fcaa4ada3d3fb9156be982a3":
        "b5e456fc2b76b77f03c93e6f47c6379c0637dbab6e53078a17b9a2e47fa1b9f1",  # students/vit-n6-2-fashion-mnist.safetensors
    "10734c57f0e4d241152ddb8355aa861a83dcc1fa00acae4eb1625bb8309ca073":
        "2c2a65d434d8705fdf1bd5fdf582dde01f53d23626f94df163c10d1a3523c544",  # teacher-fashion-mnist.safetensors
}


def _split(raw: bytes, path) -> tuple[dict, memoryview]:
    """(header, data section) of a safetensors file's bytes; ``ValueError`` naming ``path`` if it is not one."""
    if len(raw) < 8:
        raise ValueError(f"{path}: not a readable safetensors file ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or n > min(_MAX_HEADER, len(raw) - 8):
        raise ValueError(f"{path}: not a readable safetensors file (header length {n} does not fit its {len(raw)} bytes; "
                         f"the file may be truncated)")
    try:
        header = json.loads(bytes(raw[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file (unreadable header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    return header, memoryview(raw)[8 + n:]


def weights_digest(header: dict, data) -> str:
    """sha256 over the tensor entries of a safetensors header (sorted JSON, metadata excluded) and its data."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return h.hexdigest()


def state_digest(module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes and bytes, in name order): what identifies the
    frozen networks a run learns from, whatever file or folder they were read from."""
    import torch
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _metadata_digest(md: dict) -> str:
    return hashlib.sha256(json.dumps(md, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def weights_bytes(state: dict, metadata: dict[str, str]) -> bytes:
    """A safetensors file holding ``state`` (tensors, moved to the CPU) and ``metadata`` plus its checksum."""
    from safetensors.torch import save
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    md = {k: v for k, v in (metadata or {}).items() if k != CHECKSUM_KEY}
    header, data = _split(save(state, metadata=md or None), "<new file>")
    md[CHECKSUM_KEY] = weights_digest(header, data)  # the data section does not depend on the metadata
    raw = save(state, metadata=md)
    header, data = _split(raw, "<new file>")
    if weights_digest(header, data) != md[CHECKSUM_KEY]:
        raise RuntimeError("safetensors laid the same tensors out differently twice; the checksum would not hold")
    return raw


def read_weights(path) -> tuple[dict, dict[str, str]]:
    """(tensors, metadata) of a ``.safetensors`` file after checking its checksum (``ValueError`` naming the
    file when it is damaged, altered or not a safetensors file)."""
    from safetensors.torch import load
    path = Path(path)
    raw = path.read_bytes()
    header, data = _split(raw, path)
    md = header.get("__metadata__") or {}
    if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
        raise ValueError(f"{path}: its safetensors metadata must map names to strings")
    want = md.get(CHECKSUM_KEY) or LEGACY.get(_metadata_digest(md))
    if want is not None and weights_digest(header, data) != want:
        raise ValueError(f"{path} is damaged or was altered: the sha256 of its weights does not match the one "
                         f"recorded for it; export or copy it again")
    try:
        state = load(bytes(raw))
    except Exception as e:  # safetensors raises its own error types for inconsistent headers
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return state, md


def json_metadata(md: dict[str, str], key: str, path, expected: str) -> dict:
    """The JSON object under metadata ``key``; ``ValueError`` naming ``path`` if it is missing or not an object."""
    if key not in md:
        raise ValueError(f"{path}: no {key!r} metadata; expected {expected}")
    try:
        obj = json.loads(md[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its {key!r} metadata is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: its {key!r} metadata must be a JSON object, got {type(obj).__name__} "
                         f"{json.dumps(obj)[:40]}")
    return obj


def _int(meta: dict, name: str, where: str, lo: int, hi: int) -> int:
    v = meta.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        got = "missing" if name not in meta else f"got {json.dumps(v)[:40]}"
        raise ValueError(f"{where}: field {name!r} must be an integer in [{lo}, {hi}], {got}")
    return v


def check_arch(meta, where: str) -> dict:
    """The architecture fields of a teacher's metadata (``model``, ``resolution``, ``channels``,
    ``num_classes``, optional ``label_dropout`` and ``overrides``), checked; returns ``meta``."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: must be a JSON object, got {type(meta).__name__}")
    if not isinstance(meta.get("model"), str) or not meta.get("model"):
        got = "missing" if "model" not in meta else f"got {json.dumps(meta.get('model'))[:40]}"
        raise ValueError(f"{where}: field 'model' must name a network, {got}")
    _int(meta, "resolution", where, 1, MAX_RESOLUTION)
    _int(meta, "channels", where, 1, 4)
    _int(meta, "num_classes", where, 0, MAX_CLASSES)
    ld = meta.get("label_dropout", 0.0)
    if isinstance(ld, bool) or not isinstance(ld, (int, float)) or not 0 <= ld < 1:
        raise ValueError(f"{where}: field 'label_dropout' must be a number in [0, 1), got {json.dumps(ld)[:40]}")
    for name in ("overrides", "precond", "diffusers"):
        if name in meta and not isinstance(meta[name], dict):
            raise ValueError(f"{where}: field {name!r} must be a JSON object, got {json.dumps(meta[name])[:40]}")
    return meta


_METHODS = ("get", "sim", "gdd", "guided")


def check_student_meta(meta: dict, path) -> dict:
    """A student's metadata (``method``, ``config``, ``shape``, ``num_classes``; ``teacher_meta`` for SIM, GDD
    and guided students), checked against itself; returns ``meta``."""
    where = f"{path}: 'getfast_student' metadata"
    method = meta.get("method")
    if method not in _METHODS:
        raise ValueError(f"{where}: field 'method' must be one of {', '.join(_METHODS)}, got {json.dumps(method)[:40]}")
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        got = "missing" if "config" not in meta else f"got {json.dumps(cfg)[:40]}"
        raise ValueError(f"{where}: field 'config' must be the JSON object of the distillation options, {got}")
    if cfg.get("method") != method:
        raise ValueError(f"{where}: 'config' is of method {json.dumps(cfg.get('method'))}, the file says {method!r}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in shape)
            and 1 <= shape[0] <= 4 and 1 <= shape[1] <= MAX_RESOLUTION and shape[1] == shape[2]):
        raise ValueError(f"{where}: field 'shape' must be [channels, size, size] with 1-4 channels and size "
                         f"1-{MAX_RESOLUTION}, got {json.dumps(shape)[:60]}")
    k = _int(meta, "num_classes", where, 0, MAX_CLASSES)
    if method == "get":
        if not isinstance(cfg.get("model"), str):
            raise ValueError(f"{where}: 'config' must name the student network in 'model'")
        return meta
    tm = meta.get("teacher_meta")
    if tm is None:
        raise ValueError(f"{where}: a {method} student must record its teacher's architecture (field 'teacher_meta')")
    check_arch(tm, f"{where}, field 'teacher_meta'")
    want = [tm["channels"], tm["resolution"], tm["resolution"]]
    if shape != want:
        raise ValueError(f"{where}: field 'shape' {shape} does not match its teacher's images {want}")
    if k != tm["num_classes"]:
        raise ValueError(f"{where}: field 'num_classes' {k} does not match its teacher's {tm['num_classes']}")
    if method in ("sim", "gdd"):
        s = cfg.get("sigma_init")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"{where}: 'config' field 'sigma_init' must be a number > 0, got {json.dumps(s)[:40]}")
    return meta


def load_state(net, state: dict, path, strict: bool = True):
    """``net.load_state_dict(state)``; weights that do not fit are one line naming ``path`` and what differs."""
    check_fits(net, state, path, strict)
    return net.load_state_dict(state, strict=strict)


def check_fits(net, state: dict, path, strict: bool = True, what: str = "the network its metadata describes") -> None:
    """``ValueError`` naming ``path`` and what differs when ``state`` does not fit ``net`` (shapes; with ``strict``,
    missing and unexpected names too); loads nothing."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if shapes or (strict and (missing or extra)):
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} tensor(s) differ in shape (e.g. {k}: file {list(state[k].shape)}, "
                         f"network {list(own[k].shape)})")
        if strict and missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if strict and extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise ValueError(f"{path}: its weights do not fit {what}: {'; '.join(parts)}")

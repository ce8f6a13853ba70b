"""EDM teacher: training method, export to safetensors, and loading (the committed default included)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from getfast.data import load_dataset
from getfast.diffusion import EDMLoss, EDMPrecond, heun
from getfast.embedded import ASSETS, EMBEDDED  # noqa: F401  (teacher API)
from getfast.models import build_denoiser, check_teacher_model, teacher_models  # noqa: F401  (teacher API)
from getfast.limits import MAX_RESOLUTION
from getfast.train.checkpoint import list_checkpoints
from getfast.options import check_bool, check_number, check_text
from getfast.train.checkpoint import load_ema
from getfast.train.export import save_weights
from getfast.train.rng import sample_generators
from getfast.train.step import adam



@dataclass
class TeacherConfig:
    data: str = "fashion-mnist"   # fashion-mnist | digits | path.npz | image folder
    model: str = "UNet-S"         # backbone name from getfast.models
    resolution: int = 0           # 0: the data's own resolution; larger pads/resizes
    cond: bool = False            # class-conditional (labels from the data)
    label_dropout: float = 0.1    # P(label dropped) when cond: trains the unconditional branch for CFG
    lr: float = 1e-3              # Adam learning rate (after warm-up)
    grad_clip: float = 1.0        # max gradient norm (0: off)
    P_mean: float = -1.2          # ln σ ~ N(P_mean, P_std²) in training (EDM)
    P_std: float = 1.2            # (EDM: 1.2; must be > 0)

    def __post_init__(self):
        check_text("data", self.data, "a dataset name or path")
        check_teacher_model(self.model)
        check_number("resolution", self.resolution, lo=0, hi=MAX_RESOLUTION, integer=True)
        check_bool("cond", self.cond)
        check_number("label_dropout", self.label_dropout, lo=0, hi=1, hi_open=True)
        check_number("lr", self.lr, lo=0, lo_open=True)
        check_number("grad_clip", self.grad_clip, lo=0)
        # ln σ ~ N(P_mean, P_std²): beyond these the noise levels leave any range a denoiser can learn (EDM's
        # σ_max = 80 is ln σ = 4.4) and training fails with non-finite losses that look like a learning-rate fault
        check_number("P_mean", self.P_mean, lo=-10, hi=5)
        check_number("P_std", self.P_std, lo=0, hi=5, lo_open=True)


class TeacherMethod:
    """EDM denoising score matching (Karras et al. 2022, Eq. 2) on the shared training loop."""

    ema_module = "net"
    product = "teacher.safetensors"
    lr_options = {"net": "lr"}

    def __init__(self, cfg: TeacherConfig, seed: int = 0, fused: bool = False):
        """``seed`` draws the initial weights (torch's default seed is random per process, so without it two
        runs of the same command would start from different weights and exact reproduction would be lost);
        ``fused`` builds Adam with its fused kernel (:func:`getfast.train.step.adam`)."""
        self.cfg = cfg
        ds = load_dataset(cfg.data, resolution=cfg.resolution or None)
        if cfg.cond and not ds.num_classes:
            raise ValueError(f"--cond needs labels, but dataset {cfg.data!r} has none")
        self.data = ds
        self.meta = {"model": cfg.model, "resolution": ds.resolution, "channels": ds.channels,
                     "num_classes": ds.num_classes if cfg.cond else 0,
                     "label_dropout": cfg.label_dropout if cfg.cond else 0.0, "data": cfg.data}
        # Label dropout is applied in ``step`` (from per-sample generators), not inside the network, so that
        # it does not depend on the number of processes; the exported teacher records it in ``meta``.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_denoiser(cfg.model, ds.resolution, ds.channels, self.meta["num_classes"])
        self.modules = {"net": net}
        self.optimizers = {"net": adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)}
        self.grad_clip = cfg.grad_clip
        self.loss = EDMLoss(P_mean=cfg.P_mean, P_std=cfg.P_std)

    def config(self):
        return {"method": "teacher", **asdict(self.cfg)}

    def product_metadata(self) -> dict[str, str]:
        return {"getfast": json.dumps(self.meta)}

    def setup(self, wrap):
        self.net = wrap(self.modules["net"])

    def _draw(self, x, step):
        """Per-sample ln σ ~ N(0, 1), noise ~ N(0, I) and a dropout uniform, in that order from each sample's
        own generator (seeded by its global position, see ``sample_generators``) when the loop provides
        ``run_info``; otherwise from the global RNG."""
        info = getattr(self, "run_info", None)
        n = x.shape[0]
        if info is None or info.local_batch != n:
            return torch.randn(n, device=x.device), torch.randn_like(x), torch.rand(n, device=x.device)
        rnd, noise, u = torch.empty(n), torch.empty(n, *x.shape[1:]), torch.empty(n)
        for j, g in enumerate(sample_generators(info, step)):
            rnd[j] = torch.randn((), generator=g)
            noise[j] = torch.randn(x.shape[1:], generator=g)
            u[j] = torch.rand((), generator=g)
        return rnd.to(x.device), noise.to(x.device, x.dtype), u.to(x.device)

    def losses(self, batch, step):
        """EDM's denoising loss (Karras et al. 2022, Eq. 2) on this step's draws; label dropout (label −1 = no
        class) trains the unconditional branch used by classifier-free guidance."""
        x, labels = batch
        rnd, noise, u = self._draw(x, step)
        sigma = (rnd * self.loss.P_std + self.loss.P_mean).exp()  # EDMLoss.sample_sigma, from our draws
        if self.meta["num_classes"]:
            if self.meta["label_dropout"] > 0:  # label -1 = "no class": EDMPrecond maps it to a zero one-hot row
                labels = torch.where(u < self.meta["label_dropout"], torch.full_like(labels, -1), labels)
        else:
            labels = None
        return {"net": self.loss(self.net, x, labels, sigma=sigma, noise=noise).mean()}

    def sample_grid(self, ema, n):
        z = torch.randn(n, self.meta["channels"], self.meta["resolution"], self.meta["resolution"],
                        device=next(ema.parameters()).device)
        labels = torch.arange(n, device=z.device) % self.meta["num_classes"] if self.meta["num_classes"] else None
        return heun(ema, z, steps=18, class_labels=labels)


def export(denoiser: EDMPrecond, meta: dict, path) -> None:
    """Save a denoiser's weights as safetensors with the metadata needed to rebuild it (mode 0644)."""
    save_weights(denoiser, path, {"getfast": json.dumps(meta)})


def _read_export(path: Path):
    """(weights, metadata) of an exported teacher, its checksum and metadata checked (``ValueError`` naming it)."""
    from getfast.weights import check_arch, json_metadata, read_weights
    state, md = read_weights(path)
    meta = json_metadata(md, "getfast", path, "a teacher exported by getfast train-teacher or getfast convert")
    check_arch(meta, f"{path}: 'getfast' metadata")
    return state, meta


def load(name_or_path: str = "fashion-mnist", device="cpu") -> EDMPrecond:
    """Load a teacher denoiser: an embedded name, a ``.safetensors`` export, a training checkpoint, or a run
    folder (its newest good checkpoint's EMA; its ``teacher.safetensors`` if it has no checkpoint)."""
    path = EMBEDDED.get(name_or_path, Path(name_or_path))
    if not path.exists():
        raise FileNotFoundError(f"no teacher at {path}; embedded teachers: {sorted(EMBEDDED)}")
    from getfast.importers.convert import is_foreign_teacher, load_converted, load_source
    if is_foreign_teacher(path):  # an NVlabs/edm pickle or a diffusers folder, read by getfast.importers
        return load_source(str(path), device=device)
    if path.is_dir() and not list_checkpoints(path) and (path / "teacher.safetensors").exists():
        path = path / "teacher.safetensors"
    if path.suffix == ".safetensors":
        state, meta = _read_export(path)
        if "precond" in meta or "diffusers" in meta:  # converted by `getfast convert`
            _check_finite(state, path)
            return load_converted(path, state, meta, device)
    else:
        state, cfg = load_ema(path)
        meta = _meta_from_config(cfg)
    # The loaded denoiser is a deterministic function of (x, σ, label): label dropout was a property of
    # training this teacher (recorded in ``meta``), never of the copies that students start from.
    try:
        net = build_denoiser(meta["model"], meta["resolution"], meta["channels"], meta["num_classes"],
                             **meta.get("overrides", {}))
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: its metadata describes no network getfast can build ({e})") from None
    from getfast.weights import load_state
    load_state(net, state, path)
    _check_finite(state, path)
    net.meta = meta
    return net.eval().requires_grad_(False).to(device)


def _check_finite(state: dict, path) -> None:
    """A teacher with NaN/Inf weights is refused by name when it is loaded: a student distilled from it would
    diverge, and the divergence would look like a learning-rate fault."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path}: teacher weights hold NaN/Inf ({', '.join(bad[:3])}"
                         f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); it cannot teach or sample "
                         f"(did its training diverge?)")


def _meta_from_config(cfg: dict) -> dict:
    if cfg.get("method") != "teacher":
        raise ValueError(f"checkpoint is from method {cfg.get('method')!r}, not a teacher")
    tc = TeacherConfig(**{k: v for k, v in cfg.items() if k != "method"})
    try:  # a checkpoint records its data by name or path, read again here for the image shape and classes
        ds = load_dataset(tc.data, resolution=tc.resolution or None)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"this teacher checkpoint needs its training data {tc.data!r} for its image shape and classes, "
                         f"and it cannot be read from {Path.cwd()} ({e}); load the run's exported teacher.safetensors "
                         f"instead, or run from the folder the training ran in") from e
    return {"model": tc.model, "resolution": ds.resolution, "channels": ds.channels,
            "num_classes": ds.num_classes if tc.cond else 0, "label_dropout": tc.label_dropout if tc.cond else 0.0,
            "data": tc.data}

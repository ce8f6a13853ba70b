"""One entry point to sample any checkpoint: a teacher with its multi-step sampler, a one-step
student, or a guided student with its own number of DDIM steps; optionally compiled."""
from __future__ import annotations

import torch

from getfast.diffusion import ddim


def compile_for_sampling(net):
    """torch.compile a one-step student. On CUDA ``mode="reduce-overhead"`` records CUDA graphs, so with
    fixed shapes (and the DEQ solve in its zero-sync fixed-iteration mode) a batch is one graph replay."""
    cuda = next(net.parameters()).is_cuda
    return torch.compile(net, mode="reduce-overhead" if cuda else "default")


def load_sampler(ckpt: str, sampler: str = "heun", steps: int = 18, cfg_scale=None, compile: bool = False,
                 device="cpu"):
    """(sample_fn(z, labels) -> images, (C, H, W), num_classes, network evaluations per sample)."""
    from getfast.diffusion import nfe, sample
    from getfast.methods import is_student, load_student
    from getfast.teacher import load
    if is_student(ckpt):
        net = load_student(ckpt, device=device)
        meta = net.meta
        if compile:
            net = compile_for_sampling(net)
        if meta.get("sampler") == "ddim":  # guided student: DDIM at weight w; steps left at 18 = its own count
            n_steps = int(meta.get("steps", 1)) if steps == 18 else steps
            w = float(cfg_scale or 0.0)
            return (lambda z, labels: ddim(net, z, n_steps, labels, w=torch.full((z.shape[0],), w, device=z.device))), \
                tuple(meta["shape"]), meta["num_classes"], n_steps
        return (lambda z, labels: net(z, labels)), tuple(meta["shape"]), meta["num_classes"], int(meta.get("nfe", 1))
    net = load(ckpt, device=device)
    m = net.meta
    kw = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
    if compile:
        net = compile_for_sampling(net)
    return (lambda z, labels: sample(net, z, sampler, steps=steps, class_labels=labels, **kw)), \
        (m["channels"], m["resolution"], m["resolution"]), m["num_classes"], nfe(sampler, steps)

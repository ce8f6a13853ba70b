"""``getfast`` command line. Every subcommand's options come from dataclass configs, with defaults shown."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing


def _field_comments(cls) -> dict[str, str]:
    """``name: type = default  # comment`` lines of a dataclass body -> {name: comment} (the help text)."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.+)$", src, flags=re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def add_config(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--option`` per dataclass field (``snake_case`` -> ``--snake-case``), default from the field."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        typ = hints[f.name]
        kw = {"dest": f.name, "default": default, "help": comments.get(f.name, " ")}
        if typ is bool or isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, tuple):
            group.add_argument(flag, nargs="*", type=type(default[0]) if default else str, **kw)
        elif default is None:
            group.add_argument(flag, type=_parse_optional, **kw)
        else:
            group.add_argument(flag, type=type(default), **kw)


def _parse_optional(s: str):
    for t in (int, float):
        try:
            return t(s)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(s.lower(), s)


def take_config(cls, ns: argparse.Namespace, **fixed):
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(fixed)
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


def _fmt():
    return argparse.ArgumentDefaultsHelpFormatter


def _cmd_train_teacher(ns):
    from getfast.teacher import TeacherConfig, TeacherMethod, export
    from getfast.train import LoopConfig, train
    loop = take_config(LoopConfig, ns)
    method = TeacherMethod(take_config(TeacherConfig, ns), seed=loop.seed)
    train(method, loop)
    from getfast.train.loop import dist_info
    if dist_info()[0] == 0:
        from getfast.train.loop import load_ema
        ema, _ = load_ema(loop.out)
        net = method.modules["net"]
        net.load_state_dict(ema)
        export(net, method.meta, f"{loop.out}/teacher.safetensors")
        print(f"teacher weights: {loop.out}/teacher.safetensors")


def _cmd_distill(ns):
    from getfast.methods import _registry, save_student, student_meta
    from getfast.train import LoopConfig, load_ema, train
    from getfast.train.loop import dist_info
    import torch
    cfg_cls, method_cls = _registry()[ns.method]
    torch.manual_seed(ns.seed)  # students' initial weights (fresh networks, heads) follow --seed
    if hasattr(method_cls, "run_stages"):  # multi-stage methods (guided) train and export each stage themselves
        method_cls.run_stages(take_config(cfg_cls, ns), take_config(LoopConfig, ns))
        return
    method = method_cls(take_config(cfg_cls, ns))
    loop = take_config(LoopConfig, ns)
    train(method, loop)
    if dist_info()[0] == 0:
        ema, _ = load_ema(loop.out)
        product = method.modules[method.ema_module]
        product.load_state_dict(ema)
        save_student(product, student_meta(method), f"{loop.out}/student.safetensors")
        print(f"student weights: {loop.out}/student.safetensors")


def _cmd_sample(ns):
    import torch
    from getfast.metrics.grids import save_grid
    from getfast.sampling import load_sampler
    torch.manual_seed(ns.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn, shape, K, _ = load_sampler(ns.ckpt, ns.sampler, ns.steps, ns.cfg_scale, ns.compile, device)
    z = torch.randn(ns.n, *shape, device=device)
    labels = None
    if K:
        labels = (torch.full((ns.n,), ns.label) if ns.label >= 0 else torch.arange(ns.n) % K).to(device)
    with torch.no_grad():
        x = fn(z, labels)
    save_grid(x, ns.out, nrow=ns.nrow or None)
    print(f"wrote {ns.out}")


def _cmd_make_pairs(ns):
    from getfast.data.pairs import PairsConfig, make_pairs
    make_pairs(take_config(PairsConfig, ns))


def _cmd_demo(ns):
    from getfast.demo import DemoConfig, run_demo
    run_demo(take_config(DemoConfig, ns))


def _cmd_fid(ns):
    import json
    from pathlib import Path

    import torch
    from getfast.metrics.fid import fid_from_generator, folder_features, reference_stats, stats_from_features
    ref = reference_stats(ns.ref, ns.split, ns.ref_n or None, online=ns.online)
    gen = Path(ns.gen)
    if gen.is_dir() and not (gen / "student.safetensors").exists() and not any(gen.glob("ckpt-*.pt")):
        from getfast.metrics.fid import _fid_against
        feats = folder_features(gen, ns.n, online=ns.online)
        value = _fid_against(stats_from_features(feats), ref, "sqrtm")
        nfe = None
    else:
        from getfast.sampling import load_sampler
        fn, shape, K, nfe = load_sampler(ns.gen, ns.sampler, ns.steps, ns.cfg_scale)
        g = torch.Generator().manual_seed(ns.seed)

        def sample_fn(b):
            z = torch.randn(b, *shape, generator=g)
            return fn(z, torch.randint(0, K, (b,), generator=g) if K else None)
        value = fid_from_generator(sample_fn, ns.n, ref, batch=ns.batch, online=ns.online)
    result = {"fid": value, "gen": ns.gen, "ref": ns.ref, "split": ns.split, "n": ns.n, "ref_n": ns.ref_n,
              "nfe": nfe, "online_inception": ns.online, "seed": ns.seed}
    print(json.dumps(result))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(result, indent=2))


def _cmd_bench(ns):
    from benchmarks.__main__ import main as bench_main
    return bench_main(["--quick"] if ns.quick else [])


def build_parser() -> argparse.ArgumentParser:
    from getfast.teacher import TeacherConfig
    from getfast.train import LoopConfig
    p = argparse.ArgumentParser(prog="getfast", description=__doc__, formatter_class=_fmt())
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train an EDM teacher denoiser", formatter_class=_fmt())
    add_config(t, TeacherConfig)
    add_config(t, LoopConfig)
    t.set_defaults(func=_cmd_train_teacher, out="runs/teacher")

    from getfast.methods import _registry
    d = sub.add_parser("distill", help="distil a one-step student (get | sim | gdd | guided)", formatter_class=_fmt())
    dsub = d.add_subparsers(dest="method", required=True)
    for name, (cfg_cls, _) in _registry().items():
        mp = dsub.add_parser(name, help=(cfg_cls.__doc__ or name).strip().splitlines()[0], formatter_class=_fmt())
        add_config(mp, cfg_cls)
        add_config(mp, LoopConfig)
        mp.set_defaults(func=_cmd_distill, out=f"runs/{name}")

    f = sub.add_parser("fid", help="FID of a teacher/student checkpoint or an image folder (clean-fid, offline)",
                       formatter_class=_fmt())
    f.add_argument("--gen", required=True, help="student/teacher checkpoint, run folder, or image folder")
    f.add_argument("--ref", default="fashion-mnist", help="fashion-mnist | image folder | .npz (images or mu/sigma)")
    f.add_argument("--split", default="train", help="reference split for named datasets")
    f.add_argument("--n", type=int, default=10000, help="generated images")
    f.add_argument("--ref-n", type=int, default=10000, help="reference images (0: all); statistics are cached")
    f.add_argument("--sampler", default="heun", choices=["heun", "euler", "ddim"], help="teacher sampler")
    f.add_argument("--steps", type=int, default=18, help="teacher sampler steps")
    f.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight (teachers)")
    f.add_argument("--batch", type=int, default=50)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--online", action="store_true", help="use clean-fid's own (downloaded) Inception")
    f.add_argument("--out", default="", help="also write the result JSON here")
    f.set_defaults(func=_cmd_fid)

    bn = sub.add_parser("bench", help="run every benchmark and regenerate benchmarks/RESULTS.md", formatter_class=_fmt())
    bn.add_argument("--quick", action="store_true", help="smaller sizes, shorter timing")
    bn.set_defaults(func=_cmd_bench)

    from getfast.demo import DemoConfig
    dm = sub.add_parser("demo", help="distil, sample, measure and write runs/demo/report.html", formatter_class=_fmt())
    add_config(dm, DemoConfig)
    dm.set_defaults(func=_cmd_demo)

    s = sub.add_parser("sample", help="draw a sample grid from a teacher or student", formatter_class=_fmt())
    s.add_argument("--ckpt", default="fashion-mnist", help="embedded name, .safetensors, or a run folder/checkpoint")
    s.add_argument("--sampler", default="heun", choices=["heun", "euler", "ddim"])
    s.add_argument("--steps", type=int, default=18)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--nrow", type=int, default=0, help="grid columns (0: square)")
    s.add_argument("--label", type=int, default=-1, help="class for every sample (-1: cycle through classes)")
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance weight w")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the network (CUDA: reduce-overhead mode, CUDA-graph replay)")
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=_cmd_sample)

    from getfast.data.pairs import PairsConfig
    mp = sub.add_parser("make-pairs", help="sample noise/image pairs from a teacher (resumable, shards by rank)",
                        formatter_class=_fmt(), epilog="Under torchrun put -- before the subcommand "
                        "(torchrun -m getfast.cli -- make-pairs --n ...): torchrun's own parser would read --n.")
    add_config(mp, PairsConfig)
    mp.set_defaults(func=_cmd_make_pairs)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from getfast.train.checkpoint import CheckpointError
    try:
        rc = ns.func(ns)
    except (FileNotFoundError, ValueError, TypeError, CheckpointError) as e:
        print(f"getfast {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

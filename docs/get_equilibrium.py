"""GET's equilibrium, measured: does the fixed-point iteration of a trained GET converge, and does FID improve with
more iterations, for the plain fixed-point iteration and for Anderson acceleration?

    python docs/get_equilibrium.py residuals STUDENT [STUDENT ...] [--iters 30] [--n 64]
    python docs/get_equilibrium.py fid-iters STUDENT [--iters 1 2 3 6 12 30] [--solvers fixed_point anderson]
                                   [--n 1000] [--ref fashion-mnist]
    python docs/get_equilibrium.py table        # the markdown docs/make_results.py puts into docs/RESULTS.md

``residuals``: from the seeded noise start of the exported student, ``--iters`` applications of its
equilibrium map ``f`` (the map the student's own ``state`` defines: raw ``z`` for the paper's GET, ``N(z)`` for
``--state normalized``), recording per iteration k (means over ``--n`` samples, classes cycled):
``‖z_k‖``, the absolute residual ``‖f(z_k) − z_k‖``, the relative residual ``‖f(z_k) − z_k‖ / ‖f(z_k)‖`` and the
residual of the normalised state ``‖N(f(z_k)) − N(z_k)‖ / ‖N(z_k)‖`` (``N``: per-token LayerNorm without
parameters, what the decoder reads). ``fid-iters``: FID (``--n`` samples vs 10,000 reference images, the
curves' protocol) of the student evaluated with each solver for each number of iterations (function
evaluations). Records go to docs/get-equilibrium/<student>.{residuals,fid}.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "get-equilibrium"
sys.path.insert(0, str(ROOT / "docs"))


def _name(path: str) -> str:
    p = Path(path)
    return (p.parent.name if p.name == "student.safetensors" else p.stem).replace(".", "-")


def _shown(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _load(path: str):
    import torch
    from getfast.methods.students import load_student
    net = load_student(path).float()
    if not hasattr(net, "equilibrium_step"):
        raise SystemExit(f"get_equilibrium.py: error: {path} is not a GET student")
    torch.manual_seed(0)
    return net


def _inputs(net, n: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    c, h, w = net.in_channels, *net.img_resolution
    z = torch.randn(n, c, h, w, generator=g)
    labels = torch.arange(n) % net.num_classes if getattr(net, "num_classes", 0) else None
    return z, labels


def _equilibrium_map(net, n: int):
    """(f, z0): the student's own equilibrium map (raw or normalised state) on ``n`` seeded inputs, and its start."""
    import torch
    x_noise, labels = _inputs(net, n)
    x, offsets = net.inject(x_noise, labels)
    torch.manual_seed(0)
    z0 = net._initial_state(x, None)
    normalized = net.config.state == "normalized"

    def f(s):
        y = net.equilibrium_step(s, *offsets)
        return net.normalize(y) if normalized else y
    return f, z0


def residuals(path: str, iters: int, n: int) -> dict:
    """Per-iteration residuals of the student's own equilibrium map from its (seeded) noise start."""
    import torch
    net = _load(path)
    with torch.no_grad():
        f, z = _equilibrium_map(net, n)

        def norm(t):
            return t.flatten(1).norm(dim=1)

        rows = []
        for k in range(1, iters + 1):
            fz = f(z)
            nz, nfz = net.normalize(z), net.normalize(fz)
            rows.append({"iter": k, "state_norm": norm(z).mean().item(),
                         "abs": norm(fz - z).mean().item(),
                         "rel": (norm(fz - z) / (norm(fz) + 1e-9)).mean().item(),
                         "norm_rel": (norm(nfz - nz) / (norm(nz) + 1e-9)).mean().item()})
            z = fz
    return {"student": _shown(path), "state": net.config.state, "n": n, "rows": rows}


def to_tolerance(path: str, tols: list[float], solvers: list[str], n: int, max_iter: int = 100) -> dict:
    """Function evaluations each solver needs to bring the relative residual of the student's own map below each
    tolerance (per-sample ``nstep`` of getfast.deq, averaged; samples that never get there are counted)."""
    import torch
    from getfast.deq import solve
    net = _load(path)
    out = {"student": _shown(path), "state": net.config.state, "n": n, "max_iter": max_iter, "points": []}
    with torch.no_grad():
        f, z0 = _equilibrium_map(net, n)
        for solver in solvers:
            kw = {"m": 5} if solver == "anderson" else {}
            for tol in tols:
                _, st = solve(f, z0, solver=solver, max_iter=max_iter, tol=tol, stop_mode="rel", **kw)
                out["points"].append({"solver": solver, "tol": tol, "mean_nfe": st["nstep"].mean().item(),
                                      "converged": st["converged"].float().mean().item()})
    return out


def fid_iters(path: str, iters: list[int], solvers: list[str], n: int, ref: str, ref_n: int, save=None,
              previous: dict | None = None) -> dict:
    """FID per (solver, iterations); the points of ``previous`` (an earlier record of the same student, n, ref
    and ref_n) are kept and not measured again, so a table grows by its new points only."""
    import torch
    from getfast.metrics.fid import evaluate
    from make_results import seeded_sample_fn
    net = _load(path)
    base = net.config
    shape = (net.in_channels, *net.img_resolution)
    classes = getattr(net, "num_classes", 0)
    out = {"student": _shown(path), "state": base.state, "n": n, "ref": ref, "ref_n": ref_n, "points": []}
    if previous is not None and all(previous.get(k) == out[k] for k in ("student", "state", "n", "ref", "ref_n")):
        out["points"] = list(previous["points"])
    done = {(p["solver"], p["iters"]) for p in out["points"]}
    for solver in solvers:
        for k in iters:
            if (solver, k) in done:
                continue
            net.config = dataclasses.replace(base, solver=solver, eval_iters=k, tol=None,
                                             solver_kwargs={"m": 5} if solver == "anderson" else {})
            t0 = time.time()
            with torch.no_grad():
                res = evaluate(seeded_sample_fn(lambda z, y: net(z, y), shape, classes, seed=0), ref=ref, n=n,
                               split="train", ref_n=ref_n, batch_size=100, progress=False)
            out["points"].append({"solver": solver, "iters": k, "fid": res["fid"],
                                  "seconds": round(time.time() - t0, 1)})
            print(f"{_name(path)} {solver} {k:>3} iterations: FID {res['fid']:.2f}", flush=True)
            if save is not None:  # after every point: a long measurement that is stopped keeps what it measured
                save(out)
    net.config = base
    return out


def table(folder: Path = OUT) -> list[str]:
    """Markdown: the residual table and the FID-vs-iterations table of every measured student."""
    lines = []
    res = sorted(folder.glob("*.residuals.json"))
    if res:
        lines += ["", "GET's equilibrium, measured (`python docs/get_equilibrium.py residuals`): per fixed-point "
                  "iteration k from the noise start, the mean state norm, the absolute and relative residual and the "
                  "residual of the normalised state N(z) (what the decoder reads); "
                  "`state=normalized` students iterate N(z) itself.", ""]
        for p in res:
            r = json.loads(p.read_text())
            lines += [f"{p.name.split('.')[0]} (state {r['state']}, {r['n']} samples):", "",
                      "| k | ‖z_k‖ | ‖f(z)−z‖ | ‖f(z)−z‖/‖f(z)‖ | ‖N(f(z))−N(z)‖/‖N(z)‖ |",
                      "| --- | --- | --- | --- | --- |"]
            for row in r["rows"]:
                if row["iter"] in (1, 2, 3, 4, 6, 8, 12, 16, 20, 25, 30) or row is r["rows"][-1]:
                    lines.append(f"| {row['iter']} | {row['state_norm']:.4g} | {row['abs']:.4g} | {row['rel']:.3g} | "
                                 f"{row['norm_rel']:.3g} |")
            lines.append("")
    tols = sorted(folder.glob("*.tol.json"))
    if tols:
        lines += ["Function evaluations to a relative residual (`python docs/get_equilibrium.py tol`; mean over "
                  "samples of the first iteration below it, at most 100; the share that got there in brackets):", ""]
        for p in tols:
            r = json.loads(p.read_text())
            solvers = list(dict.fromkeys(pt["solver"] for pt in r["points"]))
            val = {(pt["solver"], pt["tol"]): pt for pt in r["points"]}
            lines += [f"{p.name.split('.')[0]} (state {r['state']}, {r['n']} samples):", "",
                      "| relative residual | " + " | ".join(solvers) + " |",
                      "| --- | " + " | ".join("---" for _ in solvers) + " |"]
            for tol in sorted({pt["tol"] for pt in r["points"]}, reverse=True):
                cells = []
                for s in solvers:
                    pt = val.get((s, tol))
                    cells.append("–" if pt is None else f"{pt['mean_nfe']:.1f} ({100 * pt['converged']:.0f} %)")
                lines.append(f"| {tol:g} | " + " | ".join(cells) + " |")
            lines.append("")
    fids = sorted(folder.glob("*.fid.json"))
    if fids:
        lines += ["FID against evaluation iterations (function evaluations per sample), fixed point vs Anderson "
                  "(m = 5) (`python docs/get_equilibrium.py fid-iters`):", ""]
        for p in fids:
            r = json.loads(p.read_text())
            solvers = list(dict.fromkeys(pt["solver"] for pt in r["points"]))
            its = sorted({pt["iters"] for pt in r["points"]})
            val = {(pt["solver"], pt["iters"]): pt["fid"] for pt in r["points"]}
            lines += [f"{p.name.split('.')[0]} (state {r['state']}, FID of {r['n']} samples vs {r['ref']}"
                      + (f", {r['ref_n']} images" if "ref_n" in r else "") + "):", "",
                      "| iterations | " + " | ".join(solvers) + " |", "| --- | " + " | ".join("---" for _ in solvers) + " |"]
            for k in its:
                cells = [f"{val[(s, k)]:.1f}" if (s, k) in val else "–" for s in solvers]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("residuals")
    r.add_argument("students", nargs="+")
    r.add_argument("--iters", type=int, default=30)
    r.add_argument("--n", type=int, default=64)
    f = sub.add_parser("fid-iters")
    f.add_argument("student")
    f.add_argument("--iters", type=int, nargs="+", default=[1, 2, 3, 6, 12, 30])
    f.add_argument("--solvers", nargs="+", default=["fixed_point", "anderson"])
    f.add_argument("--n", type=int, default=1000)
    f.add_argument("--ref", default="fashion-mnist")
    f.add_argument("--ref-n", type=int, default=10000)
    t = sub.add_parser("tol")
    t.add_argument("students", nargs="+")
    t.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    t.add_argument("--solvers", nargs="+", default=["fixed_point", "anderson"])
    t.add_argument("--n", type=int, default=64)
    sub.add_parser("table")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    from getfast.io import atomic_write_json
    if a.cmd == "residuals":
        for s in a.students:
            rec = residuals(s, a.iters, a.n)
            atomic_write_json(OUT / f"{_name(s)}.residuals.json", rec)
            last = rec["rows"][-1]
            print(f"{_name(s)}: k={last['iter']} |z|={last['state_norm']:.4g} abs={last['abs']:.4g} "
                  f"rel={last['rel']:.3g} normalised={last['norm_rel']:.3g}")
    elif a.cmd == "tol":
        for s in a.students:
            atomic_write_json(OUT / f"{_name(s)}.tol.json", to_tolerance(s, a.tols, a.solvers, a.n))
    elif a.cmd == "fid-iters":
        dest = OUT / f"{_name(a.student)}.fid.json"
        previous = json.loads(dest.read_text()) if dest.exists() else None
        atomic_write_json(dest, fid_iters(a.student, a.iters, a.solvers, a.n, a.ref, a.ref_n,
                                          save=lambda rec: atomic_write_json(dest, rec), previous=previous))
    else:
        print("\n".join(table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Model cards for committed weights: the exact command, seed, wall time, metrics and a sample grid."""
from __future__ import annotations

import json
import platform
from pathlib import Path

from getfast.io import atomic_write_json, atomic_write_text


def _log_summary(run_dir: Path) -> dict:
    lines = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{run_dir}/log.jsonl is empty")
    last = lines[-1]
    tail = lines[-10:]
    losses = {k: sum(r[k] for r in tail if k in r) / len(tail) for k in last if k.startswith("loss") or k.startswith("l1")}
    # A resumed run restarts its clock; sum the segments (the time field drops when a segment starts).
    wall, prev = 0.0, 0.0
    for r in lines:
        if r["time"] < prev:
            wall += prev
        prev = r["time"]
    wall += prev
    return {"kimg": last["kimg"], "steps": last["step"], "wall_time_min": round(wall / 60, 1),
            "final_losses_last10_logs": losses, "img_per_s_last": round(last.get("img_per_s", 0), 1)}


def pipeline_summary(run_dirs) -> dict:
    """Totals of a multi-stage student (guided: stage 1 then each progressive round), from the run folders of
    every stage that led to it, in order: {"kimg", "wall_time_min", "stages"}. docs/make_results.py reports
    these, not the last round's alone. A stage may be a committed student's card (``NAME.json``), whose own
    pipeline stands for the stages that led to it (a run warm-started or taught by a committed student)."""
    parts = [_card_pipeline(Path(d)) if str(d).endswith(".json") else (Path(d).name, _log_summary(Path(d)))
             for d in run_dirs]
    if not parts:
        raise ValueError("a pipeline needs at least one stage folder")
    return {"kimg": round(sum(s["kimg"] for _, s in parts), 3),
            "wall_time_min": round(sum(s["wall_time_min"] for _, s in parts), 1),
            "stages": "; ".join(f"{name} {s['kimg']:g} kimg, {s['wall_time_min']} min" for name, s in parts)}


def _card_pipeline(card: Path) -> tuple[str, dict]:
    """A committed card as one stage: (its name with its own stages, its pipeline's or its run's totals)."""
    d = json.loads(card.read_text())
    done = d.get("pipeline", d)
    name = card.stem + (f" [{done['stages']}]" if "stages" in done else "")
    return name, {"kimg": float(done["kimg"]), "wall_time_min": float(done["wall_time_min"])}


def write_card(weights: Path, run_dir: Path, command: str, title: str, extra: dict | None = None,
               grid: str | None = None) -> Path:
    """Write ``<weights>.json`` and ``<weights>.md`` beside a committed ``.safetensors``."""
    weights, run_dir = Path(weights), Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    card = {"title": title, "weights": weights.name, "command": command, "seed": cfg["loop"]["seed"],
            "config": cfg, **_log_summary(run_dir), "machine": f"{platform.machine()} CPU, torch threads 1-2",
            **(extra or {})}
    atomic_write_json(weights.with_suffix(".json"), card)
    md = [f"# {title}\n", f"Weights: `{weights.name}` (EMA, safetensors)\n", "Command:\n", f"```\n{command}\n```\n",
          f"- seed: {card['seed']}", f"- trained: {card['kimg']:.1f} kimg in {card['steps']} steps, "
          f"wall time {card['wall_time_min']} min on {card['machine']} (shared with other work)",
          f"- final losses (mean of the last 10 log lines): {json.dumps(card['final_losses_last10_logs'])}"]
    for k, v in (extra or {}).items():
        if isinstance(v, dict):  # e.g. a pipeline's totals: "kimg: 90.0, wall_time_min: 70.3, stages: ..."
            v = ", ".join(f"{kk}: {vv}" for kk, vv in v.items())
        md.append(f"- {k}: {v}")
    if grid:
        md.append(f"\n![samples]({grid})\n")
    atomic_write_text(weights.with_suffix(".md"), "\n".join(md) + "\n")
    return weights.with_suffix(".md")

"""Training curves as PNG, from the JSONL log the training loop writes (one JSON object per line)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from getfast.io import atomic_write_bytes

# Book-keeping columns of getfast.train's log: not plotted unless asked for.
_DEFAULT_SKIP = ("step", "kimg", "time", "img_per_s", "epoch", "lr")


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL log. Blank lines and a torn last line (a run still writing) are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no log file {path}")
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not JSON ({e})") from e
        if isinstance(rec, dict):
            records.append(_flatten(rec))
    return records


def _flatten(rec: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curves(records: list[dict], keys=None, x: str = "step") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """Series ``{key: (xs, ys)}`` from log records. A step logged twice (a resumed run appends again) keeps its
    last value; records without ``x`` use their index. Returns the series and the x label."""
    has_x = any(x in r for r in records)
    xlabel = x if has_x else "record"
    if keys is None:
        keys = []
        for r in records:
            for k, v in r.items():
                if k not in keys and k not in _DEFAULT_SKIP and k != x and _is_number(v):
                    keys.append(k)
    elif isinstance(keys, str):
        keys = [keys]
    series = {}
    for k in keys:
        pts: dict[float, float] = {}
        for i, r in enumerate(records):
            if k in r and _is_number(r[k]):
                xv = r.get(x, i) if has_x else i
                if _is_number(xv):
                    pts[float(xv)] = float(r[k])
        if pts:
            xs = np.array(sorted(pts))
            series[k] = (xs, np.array([pts[v] for v in xs]))
    return series, xlabel


def _centred_mean(ys: np.ndarray, width: int) -> np.ndarray:
    """Moving average over a centred window of ``width`` points (narrower at the ends): no lag."""
    h = width // 2
    c = np.cumsum(np.insert(ys, 0, 0.0))
    i = np.arange(len(ys))
    lo, hi = np.maximum(i - h, 0), np.minimum(i + h + 1, len(ys))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_curves(jsonl_path, out_png, keys=None, x: str = "step", title: str | None = None,
                smooth: int = 0, logy: bool | None = None) -> Path:
    """Plot metrics of a JSONL training log to one PNG: one panel per key against ``x`` (default ``step``).

    ``keys``: the metrics to draw (default: every numeric key but the book-keeping ones). ``smooth``: width of a
    centred moving average drawn over the raw curve (0: none). ``logy``: log scale (default: when a series is
    positive and spans more than two decades). Written atomically; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_jsonl(jsonl_path)
    series, xlabel = curves(records, keys, x)
    if keys is not None:
        missing = [k for k in ([keys] if isinstance(keys, str) else keys) if k not in series]
        if missing:
            raise ValueError(f"keys {missing} have no numeric values in {jsonl_path}")
    if not series:
        raise ValueError(f"{jsonl_path}: no numeric metrics to plot ({len(records)} records)")
    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")

    n = len(series)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.0 * cols, 3.0 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (k, (xs, ys)) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        raw_style = {"alpha": 0.35, "lw": 1} if smooth > 1 and len(ys) > smooth else {"lw": 1.2}
        ax.plot(xs, ys, color="C0", **raw_style)
        if smooth > 1 and len(ys) > smooth:
            ax.plot(xs, _centred_mean(ys, smooth), color="C0", lw=1.5)
        use_log = logy if logy is not None else bool((ys > 0).all() and ys.max() / ys.min() > 100)
        if use_log and (ys > 0).all():
            ax.set_yscale("log")
        ax.set_title(k, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())
    return out

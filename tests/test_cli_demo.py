"""The CLI surface, the committed weights, and the demo's report writer."""
import subprocess
import sys

import pytest
import torch

from getfast.cli import build_parser
from getfast.demo import _write_reports
from getfast.teacher import ASSETS, EMBEDDED


def test_every_subcommand_has_help_with_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train-teacher", "distill", "make-pairs", "sample", "fid", "demo", "bench"} <= set(sub.choices)
    text = sub.choices["train-teacher"].format_help()
    assert "--kimg" in text and "(default: 100.0)" in text and "--resume" in text
    distill = next(a for a in sub.choices["distill"]._actions if a.dest == "method")
    assert {"get", "sim", "gdd", "guided"} <= set(distill.choices)
    for name, p in distill.choices.items():
        assert "(default:" in p.format_help(), name


def test_unknown_option_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "getfast.cli", "distill", "sim", "--no-such-option", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not EMBEDDED["fashion-mnist"].exists(), reason="committed teacher missing")
def test_committed_teacher_and_students_load_and_sample():
    from getfast.sampling import load_sampler
    fn, shape, K, nfe = load_sampler("fashion-mnist", steps=2)
    assert shape == (1, 28, 28) and K == 10 and nfe == 3
    z, labels = torch.randn(2, *shape), torch.tensor([0, 7])
    with torch.no_grad():
        assert torch.isfinite(fn(z, labels)).all()
    students = sorted((ASSETS / "students").glob("*.safetensors"))
    assert students, "committed students missing"
    for p in students:
        fn, shape_s, K_s, nfe = load_sampler(str(p), cfg_scale=2.0)
        assert shape_s == shape and K_s == K and 1 <= nfe <= 4, p.name
        with torch.no_grad():
            x = fn(z, labels)
        assert x.shape == (2, *shape) and torch.isfinite(x).all(), p.name
        assert p.with_suffix(".md").exists() and p.with_suffix(".json").exists(), f"model card for {p.name}"


def test_report_writer(tmp_path):
    rows = [{"model": "teacher <x>", "fid": 58.2, "nfe": 35, "ms_per_batch": 1000.0, "speedup": 1.0,
             "grid": "grid-00.png", "note": ""},
            {"model": "sim", "fid": 72.6, "nfe": 1, "ms_per_batch": 30.0, "speedup": 33.3, "grid": "grid-01.png",
             "note": "16 kimg"}]
    meta = {"fid_n": 300, "fid_ref_n": 1000, "latency_batch": 64, "wall_time_min": 1.0, "machine": "test"}
    _write_reports(tmp_path, rows, [("live sim", "curve.png")], meta)
    html = (tmp_path / "report.html").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "teacher &lt;x&gt;" in html and "72.6" in html and "33.3×" in html and "curve.png" in html
    assert "| sim | 72.6 | 1 | 30.0 | 33.3× |" in md


def test_benchmark_entry_point_knows_every_benchmark():
    import benchmarks.__main__ as bench
    assert {"deq", "models", "pairs", "sim_loss"} <= set(bench.names())
    with pytest.raises(SystemExit):
        bench.main(["--only", "no-such-benchmark"])

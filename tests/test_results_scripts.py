"""docs/make_results.py and docs/make_curves.py: the table and the curves from stored records (no FID computed)."""
import json
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
sys.path.insert(0, str(DOCS))
make_results = pytest.importorskip("make_results")
make_curves = pytest.importorskip("make_curves")


def test_table_ratios_stale_and_missing_rows(tmp_path):
    proto = make_results.PROTOCOLS["n1000"]
    models = {key: ckpt for key, _, ckpt, _ in make_results.MODELS}
    rec = lambda key, fid, digest=None: {  # noqa: E731
        "key": key, "fid": fid, "nfe": 1, "protocol": {}, "sha256": digest or make_results.sha256(make_results.weights_of(models[key]))}
    folder = tmp_path / "fid"
    folder.mkdir()
    for name, r in {"teacher": rec("teacher", 20.0), "sim": rec("sim", 30.0), "gdd": rec("gdd", 50.0, digest="0" * 64),
                    "real": {"key": "real", "fid": 5.0}}.items():
        (folder / f"{name}.json").write_text(json.dumps(r))
    out = make_results.write_table(proto, folder, tmp_path / "RESULTS.md")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert "| 20.0 | 1.00× | – |" in rows["EDM teacher, Heun 18 steps"]
    assert "| 30.0 | 1.50× | ≤ 1.1× (not met) |" in rows["SIM (data-free)"]
    assert "(stale weights) | – |" in rows["GDD"]          # weights changed since the record: no ratio
    assert "not measured" in rows["GET-N/4 (offline pairs)"]
    assert "| 5.0 | 0.25× |" in rows["real data: 1000 test images (floor)"]
    # sample grids are linked relative to the table's own folder
    for link in [l.split("](")[1].rstrip(")") for l in out.read_text().splitlines() if l.startswith("![")]:
        assert (out.parent / link).resolve().exists(), link


def test_curves_plot_from_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    curves = tmp_path / "curves"
    curves.mkdir()
    (curves / "get-n-2.jsonl").write_text("".join(json.dumps({"kimg": k, "fid": f, "n": 1000}) + "\n"
                                                  for k, f in ((10, 90.0), (5, 120.0))))
    (curves / "vit-n6-2.jsonl").write_text(json.dumps({"kimg": 5, "fid": 100.0, "n": 1000}) + "\n")
    monkeypatch.setattr(make_curves, "CURVES", curves)
    monkeypatch.setattr(make_curves, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    assert make_curves.read_curve(curves / "get-n-2.jsonl") == [(5, 120.0), (10, 90.0)]
    written = make_curves.plot(teacher_fid=30.0, floor_fid=10.0)
    assert [p.name for p in written] == ["curves-get-vit.png"] and written[0].stat().st_size > 1000


def test_curve_table_from_the_runs_jsonl(tmp_path):
    (tmp_path / "get-n-2.jsonl").write_text("".join(json.dumps({"kimg": k, "fid": f, "n": 1000}) + "\n"
                                                    for k, f in ((5, 300.0), (10, 250.25))))
    (tmp_path / "vit-n6-2.jsonl").write_text(json.dumps({"kimg": 5, "fid": 200.0, "n": 1000}) + "\n"
                                             + json.dumps({"kimg": 5, "fid": 1.0, "n": 5000}) + "\n")
    rows = make_results.curve_table(tmp_path)
    # columns: GET-N/2, GET-N/2 started at x, ViT-N6/2, ViT-N5x/2; only n = 1,000 points, "–" where a run has none
    assert "| 5 | 300.0 | – | 200.0 | – |" in rows and "| 10 | 250.2 | – | – | – |" in rows
    assert make_results.curve_table(tmp_path / "none") == []
    title, runs = make_results.CURVE_TABLES[1]  # SIM, GDD, GDD-I
    (tmp_path / "gddi.jsonl").write_text(json.dumps({"kimg": 15, "fid": 70.04, "n": 1000}) + "\n")
    rows = make_results.curve_table(tmp_path, title, runs)
    assert rows[1] == title and "| 15 | – | – | 70.0 |" in rows


def test_cards_carry_the_measured_fid(tmp_path):
    import shutil
    proto = make_results.PROTOCOLS["n1000"]
    models = []
    for key, label, ckpt, card in make_results.MODELS[:2]:  # the teacher and SIM, copied
        w = tmp_path / make_results.weights_of(ckpt).name
        shutil.copy(make_results.weights_of(ckpt), w)
        for suffix in (".json", ".md"):
            shutil.copy(card.with_suffix(suffix), tmp_path / card.with_suffix(suffix).name)
        models.append((key, label, w, tmp_path / card.name))
    folder = tmp_path / "fid"
    folder.mkdir()
    for (key, _, w, _), fid in zip(models, (20.0, 30.0)):
        (folder / f"{key}.json").write_text(json.dumps({"key": key, "fid": fid, "sha256": make_results.sha256(w)}))
    assert len(make_results.update_cards(proto, folder, models)) == 2
    sim_card = models[1][3]
    assert json.loads(sim_card.read_text())["fid"]["n1000"]["ratio_to_teacher"] == 1.5
    md = sim_card.with_suffix(".md").read_text()
    assert md.count(make_results.FID_LINE + "n1000") == 1 and "30.0, 1.50× the teacher's 20.0" in md
    assert make_results.update_cards(proto, folder, models) == []  # idempotent
    w = models[1][2]
    w.write_bytes(w.read_bytes() + b" ")  # the weights changed: the card loses its figures (every protocol's)
    make_results.update_cards(proto, folder, models)
    assert "fid" not in json.loads(sim_card.read_text()) and make_results.FID_LINE not in sim_card.with_suffix(".md").read_text()


def test_get_claim_needs_all_three_fresh_records(tmp_path):
    ws = {}
    for key in ("get-n2", "vit-n6-2", "vit-n5x-2"):
        ws[key] = tmp_path / f"{key}.safetensors"
        ws[key].write_bytes(key.encode())
    recs = {k: {"fid": f, "sha256": make_results.sha256(ws[k])}
            for k, f in (("get-n2", 40.0), ("vit-n6-2", 50.0), ("vit-n5x-2", 38.0))}
    claim = make_results.get_claim(recs, ws)
    assert "40.0 vs the ViT of its parameters 50.0 — better: holds" in claim
    assert "≈ 5× its parameters 38.0 — no worse: does not hold" in claim
    assert make_results.get_claim({k: v for k, v in recs.items() if k != "vit-n5x-2"}, ws) is None
    ws["get-n2"].write_bytes(b"retrained")  # the record measured other weights: no verdict
    assert make_results.get_claim(recs, ws) is None


def test_adopt_student_copies_weights_and_writes_card_and_grid(tmp_path, monkeypatch):
    import torch
    adopt_student = pytest.importorskip("adopt_student")
    from getfast.methods import save_student
    from getfast.models.onestep import OneStepGenerator
    from getfast.teacher import build_denoiser
    torch.manual_seed(0)
    G = OneStepGenerator(build_denoiser("UNet-XS", 8, 1, 10), 2.5)
    run = tmp_path / "run"
    run.mkdir()
    meta = {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.0}
    save_student(G, {"method": "sim", "config": {"method": "sim", "sigma_init": 2.5}, "shape": [1, 8, 8],
                     "num_classes": 10, "teacher_meta": meta}, run / "student.safetensors")
    (run / "config.json").write_text(json.dumps({"loop": {"seed": 3}, "method": {"method": "sim"}}))
    # two resumed segments: the clock restarts, the card sums them (60 s + 30 s)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "kimg": 0.1, "time": 60.0, "loss": 1.0}, {"step": 2, "kimg": 0.2, "time": 30.0, "loss": 0.5})))
    monkeypatch.setattr(adopt_student, "STUDENTS", tmp_path / "students")
    (tmp_path / "students").mkdir()
    md = adopt_student.adopt(run, "toy", "toy student", "getfast distill sim --kimg 0.2")
    card = json.loads((tmp_path / "students" / "toy.json").read_text())
    toy = tmp_path / "students" / "toy.safetensors"
    # stored in float16 like every committed weight file: half the bytes, the same images up to that rounding
    assert toy.stat().st_size < 0.6 * (run / "student.safetensors").stat().st_size
    from getfast.sampling import load
    z, y = torch.randn(3, 1, 8, 8), torch.arange(3)
    assert torch.allclose(load(str(toy))(z, y), load(str(run / "student.safetensors"))(z, y), atol=2e-2)
    assert card["params"] == sum(p.numel() for p in G.parameters()) and card["seed"] == 3
    assert card["wall_time_min"] == 1.5 and card["kimg"] == 0.2
    assert (tmp_path / "students" / "toy.png").stat().st_size > 100 and "![samples](toy.png)" in md.read_text()
    assert "pipeline" not in card
    # A multi-stage student's card sums every stage that led to it (make_results reports the sum).
    first = tmp_path / "stage1"
    first.mkdir()
    (first / "log.jsonl").write_text(json.dumps({"step": 5, "kimg": 0.5, "time": 120.0, "loss": 2.0}) + "\n")
    with pytest.raises(ValueError, match="must end with the run itself"):
        adopt_student.adopt(run, "toy", "toy student", "cmd", pipeline=[run, first])
    adopt_student.adopt(run, "toy", "toy student", "cmd", pipeline=[first, run])
    card = json.loads((tmp_path / "students" / "toy.json").read_text())
    assert card["pipeline"]["kimg"] == 0.7 and card["pipeline"]["wall_time_min"] == 3.5
    assert card["pipeline"]["stages"] == "stage1 0.5 kimg, 2.0 min; run 0.2 kimg, 1.5 min"
    assert "- pipeline: kimg: 0.7, wall_time_min: 3.5, stages: stage1 0.5 kimg" in \
        (tmp_path / "students" / "toy.md").read_text()


def test_product_from_checkpoint_reads_the_loop_format(tmp_path, monkeypatch):
    """make_curves.eval on a run without stage students: the newest checkpoint's EMA and the images it has seen."""
    import dataclasses

    import torch
    from getfast import methods
    from getfast.train import checkpoint

    @dataclasses.dataclass
    class Cfg:
        width: int = 3

    class Method:
        ema_module, shape, num_classes = "net", (1, 2, 2), 10

        def __init__(self, cfg):
            self.modules = {"net": torch.nn.Linear(cfg.width, 1)}

    ema = torch.nn.Linear(3, 1).state_dict()
    state = {"config": {"method": "toy", "width": 3}, "loop": {"step": 7, "nimg": 2240, "batch": 320}, "ema": ema}
    monkeypatch.setitem(methods.METHODS, "toy", (Cfg, Method))
    monkeypatch.setattr(checkpoint, "latest_good_checkpoint", lambda run: (tmp_path / "ckpt-7.pt", state))
    product, kimg, shape, classes = make_curves.product_from_checkpoint(tmp_path)
    assert kimg == 2.24 and shape == (1, 2, 2) and classes == 10
    assert torch.equal(product.weight, ema["weight"]) and not product.training


def test_r16_verdict_capacity_check_then_gets_claim(tmp_path):
    def curve(name, pts):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"kimg": k, "fid": f, "n": 1000}) + "\n"
                                                        for k, f in pts))
    assert make_results.r16_verdict(tmp_path) == []
    curve("r16-vit-p6-2", [(10, 100.0), (40, 60.0)])
    curve("r16-vit-p5x-2", [(10, 90.0), (40, 48.0)])
    lines = make_results.r16_verdict(tmp_path)
    # at the largest kimg both ViTs reached: 1 - 48/60 = 20 % lower, so capacity matters; no GET line yet
    assert len(lines) == 2 and "40 kimg" in lines[1] and "20.0 % lower" in lines[1] and "matters here" in lines[1]
    curve("r16-get-p-2", [(10, 95.0)])
    lines = make_results.r16_verdict(tmp_path)
    assert "10 kimg" in lines[2] and "better: holds" in lines[2] and "no worse: does not hold" in lines[2]
    curve("r16-vit-p5x-2", [(10, 90.0), (40, 55.0)])
    assert "does not yet matter" in make_results.r16_verdict(tmp_path)[1]


def test_equilibrium_tables_from_records(tmp_path):
    get_equilibrium = pytest.importorskip("get_equilibrium")
    rows = [{"iter": k, "state_norm": 10.0 * k, "abs": 5.0, "rel": 0.5 / k, "norm_rel": 0.1 / k ** 2} for k in range(1, 31)]
    (tmp_path / "s.residuals.json").write_text(json.dumps({"state": "raw", "n": 8, "rows": rows}))
    (tmp_path / "s.fid.json").write_text(json.dumps({"state": "raw", "n": 100, "ref": "r", "points": [
        {"solver": "fixed_point", "iters": 1, "fid": 80.0}, {"solver": "anderson", "iters": 1, "fid": 81.0},
        {"solver": "fixed_point", "iters": 6, "fid": 70.04}]}))
    text = "\n".join(get_equilibrium.table(tmp_path))
    assert "| 30 | 300 | 5 | 0.0167 | 0.000111 |" in text
    assert "| fixed_point | anderson |" in text and "| 1 | 80.0 | 81.0 |" in text and "| 6 | 70.0 | – |" in text


def test_pipeline_summary_counts_a_committed_students_stages(tmp_path):
    """A round taught by (or warm-started from) a committed student reports that student's whole pipeline plus its
    own run, segments of a resumed run summed."""
    from getfast.cards import pipeline_summary
    run = tmp_path / "pd-2"
    run.mkdir()
    rows = [{"step": 10, "kimg": 12.0, "time": 600.0}, {"step": 5, "kimg": 20.0, "time": 120.0},  # resumed
            {"step": 30, "kimg": 48.0, "time": 1800.0}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    card = tmp_path / "guided-4-fashion-mnist.json"
    card.write_text(json.dumps({"kimg": 24.0, "wall_time_min": 17.5, "pipeline": {"kimg": 42.0, "wall_time_min": 30.1,
                                                                 "stages": "stage1 8 kimg, 5.6 min; pd-4 34 kimg, 24.5 min"}}))
    got = pipeline_summary([card, run])
    assert got["kimg"] == 90.0 and got["wall_time_min"] == pytest.approx(30.1 + (600 + 1800) / 60, abs=0.05)
    assert got["stages"] == ("guided-4-fashion-mnist [stage1 8 kimg, 5.6 min; pd-4 34 kimg, 24.5 min] 42 kimg, 30.1 min; "
                             "pd-2 48 kimg, 40.0 min")

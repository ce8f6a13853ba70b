"""Commit a trained run's student: copy its exported EMA into getfast/assets/students/, with a model card and a grid.

    python docs/adopt_student.py RUN NAME --title TITLE --command "the command that trained RUN" [--pipeline STAGE ...]

writes ``getfast/assets/students/NAME.safetensors`` (RUN/student.safetensors, the EMA the run exported last),
``NAME.json``/``NAME.md`` (command, seed, config, kimg, wall time summed over resumed segments, final losses,
parameters; getfast.cards) and ``NAME.png`` (10×10 grid, columns are classes, seed 0). The FID line of the card is
added by docs/make_results.py once the student is in its MODELS and measured. ``--pipeline`` names the run folders of
every stage that led to a multi-stage student (guided: stage 1, then each progressive round, RUN last); the card
then carries their summed kimg and wall time, which docs/make_results.py reports. Like every committed weight file
(tests/test_packaging.py), the weights are stored in float16: half the bytes; loading casts them back to float32,
and the table measures exactly the committed file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDENTS = ROOT / "getfast" / "assets" / "students"


def adopt(run: Path, name: str, title: str, command: str, pipeline=()) -> Path:
    from getfast.cards import pipeline_summary, write_card
    from getfast.cli import main as cli
    from getfast.sampling import load
    from getfast.weights import read_weights, weights_bytes

    src = run / "student.safetensors"
    stages = [Path(p) for p in pipeline]
    if stages and stages[-1].resolve() != run.resolve():
        raise ValueError(f"--pipeline must end with the run itself ({run}), got {stages[-1]}")
    summary = pipeline_summary(stages) if stages else None  # validates every stage's log before any copying
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist: the run has not exported a student yet")
    dst = STUDENTS / f"{name}.safetensors"
    tmp = dst.with_suffix(".safetensors.tmp")
    state, meta = read_weights(src)  # the run's export, its checksum verified
    # stored in half precision: the file gets the checksum of what it holds (weights_bytes recomputes it)
    tmp.write_bytes(weights_bytes({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, meta))
    tmp.chmod(0o644)  # like a copied file: readable by everyone who can read the repository
    tmp.replace(dst)  # atomic: a reader never sees half a file
    s = load(str(dst))
    params = sum(p.numel() for p in s.net.parameters())
    png = dst.with_suffix(".png")
    if cli(["sample", "--ckpt", str(dst), "--n", "100", "--nrow", "10", "--seed", "0", "--device", "cpu",
            "--out", str(png)]) != 0:
        raise RuntimeError(f"sampling {dst} failed")
    return write_card(dst, run, command, title, grid=png.name,
                      extra={"params": params, "network evaluations per sample": s.evaluations,
                             "grid": "10x10, columns = classes, seed 0",
                             **({"pipeline": summary} if summary else {})})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="run folder with student.safetensors, config.json and log.jsonl")
    p.add_argument("name", help="asset name, e.g. get-n2-fashion-mnist")
    p.add_argument("--title", required=True)
    p.add_argument("--command", required=True, help="the exact command that trained the run")
    p.add_argument("--pipeline", type=Path, nargs="+", default=(),
                   help="run folders of every stage that led to this student, in order, ending with RUN")
    a = p.parse_args(argv)
    if not a.run.is_dir():
        p.error(f"run folder {a.run} does not exist")
    print(f"wrote {adopt(a.run, a.name, a.title, a.command, a.pipeline)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

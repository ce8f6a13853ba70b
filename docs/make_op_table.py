"""Rewrite README.md's op × backend table from the op registry (``getfast.ops.OPS`` and ``DEFAULTS``).

    python docs/make_op_table.py
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- op-table:begin -->", "<!-- op-table:end -->"
BACKENDS = ("reference", "triton", "cuda", "cpp")


def table() -> str:
    from getfast.ops import DEFAULTS, OPS
    rows = ["| op | " + " | ".join(BACKENDS) + " | default on CPU | default on CUDA (why) |",
            "| --- | " + " | ".join("---" for _ in BACKENDS) + " | --- | --- |"]
    for name, op in OPS.items():
        if op.spec.family is not None or name.startswith("_"):
            continue  # a backward op follows its forward; "_" ops are private (tests define some)
        have = ["✓" if b in op.spec.launchers else "–" for b in BACKENDS]
        cpu = DEFAULTS.get((name, "cpu"), ("reference", ""))[0]
        cuda, why = DEFAULTS.get((name, "cuda"), ("reference", "no GPU measurement: the built-in"))
        rows.append(f"| `getfast::{name}` | " + " | ".join(have) + f" | {cpu} | {cuda} ({why}) |")
    return "\n".join(rows)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(f"wrote {readme}")


if __name__ == "__main__":
    main()

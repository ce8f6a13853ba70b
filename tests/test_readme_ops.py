"""README's op × backend table is the registry's (regenerate with `python docs/make_op_table.py`)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_op_table_matches_registry():
    spec = importlib.util.spec_from_file_location("make_op_table", ROOT / "docs" / "make_op_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    assert f"{mod.BEGIN}\n{mod.table()}\n{mod.END}" in readme, "README's op table is stale: run docs/make_op_table.py"

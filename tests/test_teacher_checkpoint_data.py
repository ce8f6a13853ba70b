"""A teacher checkpoint records its data by (possibly relative) path: loading it from elsewhere is a clear error."""
import numpy as np
import pytest

from getfast import teacher as teacher_mod
from getfast.cli import main


def test_teacher_checkpoint_whose_relative_data_is_gone_names_the_data_and_the_way_out(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    np.savez(work / "tiny.npz", x=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8))
    monkeypatch.chdir(work)
    assert main(["train-teacher", "--data", "tiny.npz", "--model", "UNet-XS", "--batch", "8", "--kimg", "0.016",
                 "--log-every", "1", "--ckpt-every", "2", "--grid-every", "0", "--no-progress", "--out", "run"]) == 0
    teacher_mod.load(str(work / "run"))  # from the folder it trained in: fine
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'tiny.npz'.*teacher\.safetensors instead"):
        teacher_mod.load(str(work / "run"))
    teacher_mod.load(str(work / "run" / "teacher.safetensors"))  # the export carries its own shape
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(work / "run"), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("getfast sample: error:") and "tiny.npz" in err[0]

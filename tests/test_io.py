"""getfast.io: the package's one atomic writer and the image writers built on it."""
import errno
import os
import stat

import numpy as np
import pytest
import torch

from getfast import io as gio


def test_atomic_write_replaces_and_leaves_no_debris(tmp_path):
    p = tmp_path / "sub" / "a.bin"
    gio.atomic_write_bytes(p, b"old")
    gio.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"new"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.bin"]
    gio.atomic_write_bytes(p, b"x", mode=0o644)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    gio.atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert (tmp_path / "r.json").read_text().strip() == '{\n  "a": 1\n}'
    with pytest.raises(ValueError, match="non-finite"):
        gio.atomic_write_json(tmp_path / "bad.json", {"loss": float("nan")})
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(ValueError, match="must be bytes"):
        gio.atomic_write_bytes(tmp_path / "s", "text")


def test_checkpoint_module_reexports_the_writer():
    from getfast.train.checkpoint import atomic_write_bytes
    assert atomic_write_bytes is gio.atomic_write_bytes


def _fail_with(monkeypatch, code, where="write"):
    real = getattr(os, where)

    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(gio.os, where, fail)
    return real


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_write_failure_is_one_clean_oserror_naming_the_target(tmp_path, monkeypatch, code):
    p = tmp_path / "out.png"
    p.write_bytes(b"old")
    _fail_with(monkeypatch, code)
    with pytest.raises(OSError) as info:
        gio.atomic_write_bytes(p, b"new content")
    e = info.value
    assert e.errno == code and e.filename == str(p)
    assert e.__cause__ is None and e.__suppress_context__  # no chained traceback about a temp file
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["out.png"]


def test_cleanup_failure_does_not_replace_the_error(tmp_path, monkeypatch):
    _fail_with(monkeypatch, errno.ENOSPC)
    real_unlink = type(tmp_path).unlink

    def unlink(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "cleanup denied")
    monkeypatch.setattr(type(tmp_path), "unlink", unlink)
    with pytest.raises(OSError) as info:
        gio.atomic_write_bytes(tmp_path / "x", b"data")
    monkeypatch.setattr(type(tmp_path), "unlink", real_unlink)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x")


def test_path_below_a_file_is_a_clean_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError) as info:
        gio.atomic_write_bytes(f / "sub" / "out.bin", b"x")
    assert str(f) in str(info.value) and info.value.__cause__ is None
    with pytest.raises(NotADirectoryError, match="is a file"):
        gio.check_writable(f / "sub" / "run")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        gio.check_writable(f, "folder")
    with pytest.raises(IsADirectoryError):
        gio.check_writable(tmp_path, "file")
    with pytest.raises(IsADirectoryError):
        gio.atomic_write_bytes(tmp_path, b"x")
    assert gio.check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_check_writable_reports_permission(tmp_path, monkeypatch):
    monkeypatch.setattr(gio.os, "access", lambda *a: False)  # tests may run as root, where chmod does not bite
    with pytest.raises(PermissionError, match="no write permission"):
        gio.check_writable(tmp_path / "run")


def test_keyboard_interrupt_mid_write_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a"
    p.write_bytes(b"old")

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(gio.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gio.atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["a"]


def test_grid_and_images(tmp_path):
    x = torch.linspace(-1, 1, 2 * 1 * 4 * 4).reshape(2, 1, 4, 4)
    path = gio.save_grid(x, tmp_path / "g.png", nrow=2)
    from PIL import Image
    with Image.open(path) as im:
        assert im.size == (2 * 5 + 1, 5 + 1)
    with pytest.raises(ValueError, match="empty"):
        gio.save_grid(x[:0], tmp_path / "e.png")
    with pytest.raises(ValueError, match="NaN"):
        gio.save_grid(torch.full((1, 1, 2, 2), float("nan")), tmp_path / "n.png")
    paths = gio.save_images(np.zeros((3, 4, 4), np.uint8), tmp_path / "imgs")
    assert [p.name for p in paths] == ["000000.png", "000001.png", "000002.png"]

"""FID: the Fréchet distance, the bundled Inception network, clean-fid agreement and the stats cache.

Inception-v3 runs at a few images per second on two CPU cores and a 2048-d matrix square root takes
tens of seconds, so the default tests embed few images and compare full 2048-d FIDs only in a test
marked slow.
"""
import warnings

import numpy as np
import pytest
import torch

from getfast.metrics import fid as F
from getfast.io import save_images


# ---------------------------------------------------------------------------------------------- helpers

def _random_gaussian(rng, d, n, shift=0.0):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ a + shift + rng.standard_normal(d) * 0.1


def _independent_fid(f1, f2):
    """Float64 FID from features by a different route: Tr √(Σ₁Σ₂) via symmetric eigendecompositions."""
    from scipy import linalg
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1 = (f1 - mu1).T @ (f1 - mu1) / (len(f1) - 1)
    c2 = (f2 - mu2).T @ (f2 - mu2) / (len(f2) - 1)
    w, v = linalg.eigh(c1)
    r = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
    lam = linalg.eigvalsh(r @ c2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.maximum(lam, 0)).sum())


def _blobs(rng, n, size=28):
    """Grey uint8 images (n, size, size): a Gaussian blob with noise, different per image."""
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cx, cy = rng.uniform(size * 0.2, size * 0.8, 2)
        r = rng.uniform(size * 0.1, size * 0.3)
        img = 255 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) + rng.normal(0, 12, (size, size))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


class CountingExtractor:
    """Cheap stand-in network: 3×4×4 average-pooled pixels (48-d), counting the images it sees."""
    name = "test/avgpool48"
    device = torch.device("cpu")

    def __init__(self):
        self.images = 0

    def __call__(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 255
        self.images += x.shape[0]
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) / 255


class Projected:
    """The real Inception features times a fixed random (2048, k) matrix: a full-rank k-d FID for few images."""

    def __init__(self, k=8):
        self.inner = F.get_extractor(device="cpu")
        self.proj = torch.randn(2048, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 45
        self.name = f"{self.inner.name}+proj{k}"
        self.device = torch.device("cpu")

    def __call__(self, x):
        return (self.inner(x).double() @ self.proj).float()


# ---------------------------------------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_matches_independent_float64(method):
    rng = np.random.default_rng(0)
    f1, f2 = _random_gaussian(rng, 24, 400), _random_gaussian(rng, 24, 300, shift=0.3)
    s1, s2 = F.stats_from_features(f1), F.stats_from_features(f2)
    assert s1.mu.dtype == np.float64 and s1.sigma.shape == (24, 24)
    got = F.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, method=method)
    want = _independent_fid(f1, f2)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-8, abs=1e-10)
    # symmetric in its two arguments
    assert F.frechet_distance(s2.mu, s2.sigma, s1.mu, s1.sigma, method=method) == pytest.approx(got, rel=1e-8)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_identical_sets_is_zero(method):
    rng = np.random.default_rng(1)
    s = F.stats_from_features(_random_gaussian(rng, 32, 500))
    assert abs(F.frechet_distance(s.mu, s.sigma, s.mu, s.sigma, method=method)) < 1e-8 * np.trace(s.sigma)


def test_frechet_rank_deficient_is_finite_and_real():
    """Fewer samples than dimensions (singular Σ): sqrtm's tiny imaginary part is dropped, result is a float."""
    rng = np.random.default_rng(2)
    f1, f2 = _random_gaussian(rng, 96, 12), _random_gaussian(rng, 96, 12, shift=0.5)
    s1, s2 = F.stats_from_features(f1), F.stats_from_features(f2)
    a = F.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    b = F.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, method="eigh")
    assert isinstance(a, float) and np.isfinite(a)
    assert a == pytest.approx(b, rel=1e-6)
    assert abs(F.frechet_distance(s1.mu, s1.sigma, s1.mu, s1.sigma)) < 1e-6 * np.trace(s1.sigma)


def test_frechet_eps_offset_on_failure(monkeypatch):
    """A non-finite first square root is retried with eps on both diagonals."""
    from scipy import linalg
    calls = []
    real = linalg.sqrtm

    def flaky(a, *args, **kw):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(linalg, "sqrtm", flaky)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    got = F.frechet_distance(np.zeros(2), s1, np.ones(2), s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    assert got == pytest.approx(2 + 1 + 9 + 4 + 1 - 2 * (3 + 2), abs=1e-5)


def test_frechet_bad_inputs():
    with pytest.raises(ValueError, match="mu1"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        F.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="sigma2"):
        F.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="method"):
        F.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(ValueError, match="feats"):
        F.stats_from_features(np.zeros((1, 4)))


# ---------------------------------------------------------------------------------------------- the Inception network

def test_bundled_inception_is_found():
    p = F.inception_weights_path()
    assert p.name == "default_1.pt" and p.stat().st_size > 50_000_000


def test_inception_embeds_images_to_2048d():
    rng = np.random.default_rng(3)
    gray = _blobs(rng, 4)                                           # uint8 (4, 28, 28): grey, no channel axis
    feats = F.features_from_images(gray, batch_size=4, device="cpu", progress=False)
    assert feats.shape == (4, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and (feats >= 0).all()         # pool features after ReLU
    assert np.abs(feats).sum(1).min() > 0
    assert not np.allclose(feats[0], feats[1])                     # different images, different features
    # The same images as floats in [-1, 1] NCHW (grey repeated to RGB inside) give the same features.
    as_float = torch.from_numpy(gray).float().div(127.5).sub(1).unsqueeze(1)
    np.testing.assert_allclose(F.features_from_images(as_float, batch_size=4, device="cpu", progress=False),
                               feats, rtol=1e-4, atol=1e-4)


def test_inception_input_validation():
    ext = F.get_extractor(device="cpu")
    with pytest.raises(ValueError, match="299"):
        ext(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="images"):
        F.features_from_images(np.zeros((2, 8, 8, 5), np.uint8), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        F.features_from_images(torch.full((2, 1, 8, 8), float("nan")), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        F.features_from_images(np.zeros((2, 8, 8), np.uint8), batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------- clean-fid agreement

@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two sets of 12 grey images as PNG folders, and our array-path Inception features of each (computed once)."""
    rng = np.random.default_rng(4)
    a, b = _blobs(rng, 12), _blobs(rng, 12, size=32)[:, 2:30, 2:30]
    root = tmp_path_factory.mktemp("fid_sets")
    save_images(a, root / "a")
    save_images(b, root / "b")
    fa = F.features_from_images(a, batch_size=12, device="cpu", progress=False)
    fb = F.features_from_images(b, batch_size=12, device="cpu", progress=False)
    return root / "a", root / "b", fa, fb


def test_cleanfid_folder_features_match_ours(two_sets):
    """clean-fid's file reading + "clean" resize + our extractor == our array path (2048-d, atol 1e-4)."""
    dir_a, _, fa, _ = two_sets
    theirs = F.folder_features(dir_a, batch_size=6, device="cpu", progress=False)
    assert theirs.shape == fa.shape == (12, 2048)
    np.testing.assert_allclose(theirs, fa, rtol=0, atol=1e-4)


def test_cleanfid_compute_fid_agrees_with_ours(two_sets):
    """clean-fid's ``compute_fid(dir1, dir2, custom_feat_extractor=...)`` vs our array path, on the real Inception
    features projected to 8-d (full rank with 12 images, so well conditioned): relative tolerance 1e-4."""
    dir_a, dir_b, fa, fb = two_sets
    ext = Projected(8)
    theirs = F.fid_from_folders(dir_a, dir_b, batch_size=12, extractor=ext, progress=False)
    proj = ext.proj.numpy()
    sa, sb = F.stats_from_features(fa @ proj), F.stats_from_features(fb @ proj)
    ours = F.frechet_distance(sb.mu, sb.sigma, sa.mu, sa.sigma)
    assert ours > 0
    assert ours == pytest.approx(theirs, rel=1e-4)


@pytest.mark.slow
def test_cleanfid_compute_fid_agrees_full_2048d(two_sets):
    """Full 2048-d FID, clean-fid (scipy sqrtm) vs ours (eigh route): relative tolerance 1e-3 (rank-deficient Σ).
    Dominated by clean-fid's 2048×2048 sqrtm (tens of seconds on two cores)."""
    dir_a, dir_b, fa, fb = two_sets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy: "Matrix is singular" (12 samples, 2048 dimensions)
        theirs = F.fid_from_folders(dir_a, dir_b, batch_size=12, device="cpu", progress=False)
    sa, sb = F.stats_from_features(fa), F.stats_from_features(fb)
    ours = F.frechet_distance(sb.mu, sb.sigma, sa.mu, sa.sigma, method="eigh")
    assert ours == pytest.approx(theirs, rel=1e-3)


# ---------------------------------------------------------------------------------------------- reference stats cache

def test_reference_stats_cache_hit_skips_work(tmp_path, monkeypatch):
    monkeypatch.setenv("GETFAST_CACHE", str(tmp_path / "gc"))
    rng = np.random.default_rng(5)
    data = _blobs(rng, 20)
    loads = []

    def loader(name, split, n):
        loads.append((name, split, n))
        return data[:n]

    ext = CountingExtractor()
    s1 = F.reference_stats("fashion-mnist", split="test", n=10, loader=loader, extractor=ext, progress=False)
    assert loads == [("fashion-mnist", "test", 10)] and ext.images == 10
    files = list((tmp_path / "gc" / "fid").glob("*.npz"))
    assert len(files) == 1 and "fashion-mnist_test_n10_clean" in files[0].name
    assert not list((tmp_path / "gc" / "fid").glob("*.tmp"))           # atomic write left no temp file

    s2 = F.reference_stats("fashion-mnist", split="test", n=10, loader=loader, extractor=ext, progress=False)
    assert len(loads) == 1 and ext.images == 10                        # cache hit: no loading, no features
    np.testing.assert_array_equal(s1.mu, s2.mu)
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    assert s2.n == 10 and s2.extractor == ext.name

    F.reference_stats("fashion-mnist", split="test", n=12, loader=loader, extractor=ext, progress=False)
    F.reference_stats("fashion-mnist", split="train", n=10, loader=loader, extractor=ext, progress=False)
    assert len(loads) == 3 and ext.images == 32                        # other n, other split: new entries
    F.reference_stats("fashion-mnist", split="test", n=10, loader=loader, extractor=ext, progress=False,
                      refresh=True)
    assert len(loads) == 4
    assert len(list((tmp_path / "gc" / "fid").glob("*.npz"))) == 3


def test_reference_stats_corrupt_cache_is_recomputed(tmp_path):
    ext = CountingExtractor()
    data = _blobs(np.random.default_rng(6), 6)
    s = F.reference_stats(data, n=None, cache_dir=tmp_path, extractor=ext, progress=False)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"truncated")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        s2 = F.reference_stats(data, n=None, cache_dir=tmp_path, extractor=ext, progress=False)
    assert ext.images == 12
    np.testing.assert_allclose(s2.mu, s.mu)


def test_reference_stats_sources_agree(tmp_path):
    """An array, an image folder (through clean-fid's file path) and an .npz of the same images give one result."""
    ext = CountingExtractor()
    data = _blobs(np.random.default_rng(7), 9)
    from_array = F.reference_stats(data, n=8, cache_dir=tmp_path / "c", extractor=ext, progress=False)
    save_images(data, tmp_path / "folder")
    from_folder = F.reference_stats(tmp_path / "folder", n=8, cache_dir=tmp_path / "c", extractor=ext,
                                    progress=False)
    np.savez(tmp_path / "imgs.npz", x=data)
    from_npz = F.reference_stats(tmp_path / "imgs.npz", n=8, cache_dir=tmp_path / "c", extractor=ext,
                                 progress=False)
    for s in (from_folder, from_npz):
        assert s.n == 8
        np.testing.assert_allclose(s.mu, from_array.mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.sigma, from_array.sigma, rtol=1e-4, atol=1e-7)
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3
    # An .npz of ready statistics is returned as it is (no features computed).
    seen = ext.images
    from_array.save(tmp_path / "stats.npz")
    loaded = F.reference_stats(tmp_path / "stats.npz", extractor=ext)
    assert ext.images == seen and loaded.n == 8 and loaded.extractor == ext.name
    np.testing.assert_array_equal(loaded.sigma, from_array.sigma)


def test_reference_stats_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("GETFAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert F.cache_root() == tmp_path / "xdg" / "getfast" / "fid"
    monkeypatch.setenv("GETFAST_CACHE", str(tmp_path / "mine"))
    assert F.cache_root() == tmp_path / "mine" / "fid"


def test_reference_stats_bad_ref(tmp_path):
    with pytest.raises(ValueError, match="ref"):
        F.reference_stats(str(tmp_path / "nope"), extractor=CountingExtractor())
    with pytest.raises(ValueError, match="ref"):
        F.reference_stats(42, extractor=CountingExtractor())
    with pytest.raises(ValueError, match="n must"):
        F.reference_stats("fashion-mnist", n=0, extractor=CountingExtractor())


def test_reference_stats_fashion_mnist_default_loader(tmp_path):
    """The default loader reads the real Fashion-MNIST files through getfast.data (skipped if not installed)."""
    from getfast.data import datasets
    try:
        datasets.find_fashion_mnist()
    except datasets.DatasetError:
        pytest.skip("Fashion-MNIST IDX files not installed")
    x = F.load_named_dataset("fashion-mnist", "test", 5)
    assert x.shape == (5, 28, 28, 1) and x.dtype == np.uint8
    ext = CountingExtractor()
    s = F.reference_stats("fashion-mnist", split="test", n=5, cache_dir=tmp_path, extractor=ext, progress=False)
    assert s.n == 5 and ext.images == 5


# ---------------------------------------------------------------------------------------------- FID entry points

def test_fid_from_generator_batches_and_matches_images():
    ext = CountingExtractor()
    rng = np.random.default_rng(8)
    pool = torch.from_numpy(_blobs(rng, 23)).float().div(127.5).sub(1).unsqueeze(1)   # [-1, 1] NCHW
    ref = F.stats_from_features(F.features_from_images(pool, extractor=ext, progress=False), ext.name)
    sizes, pos = [], [0]

    def sample_fn(b):
        sizes.append(b)
        out = pool[pos[0]:pos[0] + b]
        pos[0] += b
        return out

    fid = F.fid_from_generator(sample_fn, 23, ref, batch=10, extractor=ext, progress=False)
    assert sizes == [10, 10, 3]
    assert abs(fid) < 1e-6                                        # the same 23 images as the reference
    assert F.fid_from_images(pool, ref, extractor=ext, progress=False) == pytest.approx(fid, abs=1e-9)
    other = torch.from_numpy(_blobs(rng, 23)).float().div(127.5).sub(1).unsqueeze(1)
    assert F.fid_from_images(other, ref, extractor=ext, progress=False) > 1e-4
    with pytest.raises(ValueError, match="sample_fn"):
        F.fid_from_generator(lambda b: pool[:1], 4, ref, batch=2, extractor=ext, progress=False)


def test_fid_refuses_stats_from_another_network():
    ext = CountingExtractor()
    imgs = _blobs(np.random.default_rng(9), 4)
    ref = F.FIDStats(np.zeros(48), np.eye(48), 100, F.ONLINE_NAME)
    with pytest.raises(ValueError, match="not comparable"):
        F.fid_from_images(imgs, ref, extractor=ext, progress=False)
    with pytest.raises(ValueError, match="48-d|2048-d"):
        F.fid_from_images(imgs, (np.zeros(2048), np.eye(2048)), extractor=ext, progress=False)


def test_online_uses_cleanfids_own_inception(monkeypatch):
    """online=True builds clean-fid's Inception (network needed, so stubbed here) with the "clean" mode."""
    import cleanfid.features
    seen = {}

    def fake_build(mode, device=None, use_dataparallel=True):
        seen.update(mode=mode, device=device, dp=use_dataparallel)
        return lambda x: torch.ones(x.shape[0], 2048)

    monkeypatch.setattr(cleanfid.features, "build_feature_extractor", fake_build)
    F._cached_extractor.cache_clear()
    try:
        ext = F.get_extractor(online=True, device="cpu")
        assert ext.name == F.ONLINE_NAME and seen == {"mode": "clean", "device": torch.device("cpu"), "dp": False}
        feats = F.features_from_images(np.zeros((2, 8, 8), np.uint8), online=True, device="cpu", progress=False)
        assert feats.shape == (2, 2048)
    finally:
        F._cached_extractor.cache_clear()


def test_evaluate_record_for_each_kind_of_gen(tmp_path):
    """``evaluate`` (the body of ``getfast fid``): folder, .npz, array and sampling function give one FID."""
    import json
    ext = CountingExtractor()
    rng = np.random.default_rng(10)
    ref, gen = _blobs(rng, 10), _blobs(rng, 10)
    save_images(gen, tmp_path / "gen")
    np.savez(tmp_path / "gen.npz", x=gen)
    as_float = torch.from_numpy(gen).float().div(127.5).sub(1).unsqueeze(1)
    kw = dict(n=8, cache_dir=tmp_path / "cache", extractor=ext, progress=False)
    rec = F.evaluate(tmp_path / "gen", ref, out_json=tmp_path / "out" / "fid.json", **kw)
    assert json.loads((tmp_path / "out" / "fid.json").read_text()) == rec
    assert rec["n"] == 8 and rec["ref_n"] == 8 and rec["preprocessing"] == "clean" and rec["fid"] > 0
    assert rec["extractor"] == ext.name
    for gen_like in (tmp_path / "gen.npz", gen, lambda b: as_float[:b]):
        assert F.evaluate(gen_like, ref, **kw)["fid"] == pytest.approx(rec["fid"], rel=1e-6)
    with pytest.raises(ValueError, match="gen"):
        F.evaluate(tmp_path / "missing", ref, **kw)


def test_fid_command_samples_a_checkpoint_through_evaluate(tmp_path, monkeypatch, capsys):
    """``getfast fid`` on a checkpoint: the sampler's images go through ``evaluate``; the record names the
    checkpoint, its network evaluations and the seed, and is written atomically to --out."""
    import json

    from getfast.cli import main
    from getfast.teacher import build_denoiser, export
    import math
    ext = CountingExtractor()
    monkeypatch.setattr(F, "get_extractor", lambda online=False, device=None: ext)
    monkeypatch.setenv("GETFAST_CACHE", str(tmp_path / "cache"))  # the reference statistics' cache
    torch.manual_seed(0)
    D = build_denoiser("UNet-XS", 8, 1, 10)
    teacher = tmp_path / "teacher.safetensors"
    export(D, {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.1}, teacher)
    ref = tmp_path / "ref.npz"
    np.savez(ref, x=_blobs(np.random.default_rng(0), 6, size=8))
    out = tmp_path / "fid.json"
    assert main(["fid", "--gen", str(teacher), "--ref", str(ref), "--n", "4", "--ref-n", "0", "--steps", "1",
                 "--batch", "2", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["gen"] == str(teacher) and rec["nfe"] == 1 and rec["n"] == 4 and rec["ref_n"] == 6 and rec["seed"] == 0
    assert math.isfinite(rec["fid"]) and ext.images == 4 + 6
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rec

"""Learned whitening (aml whiten) against a direct transcription of cirtorch's whitenlearn / whitenapply."""

from __future__ import annotations

import os

import numpy as np
import pytest

from aml.whiten import Lw, learn_lw, learn_pca


# ---- cirtorch utils/whiten.py, transcribed (columns are vectors: X is (D, N)) ------------------------------
def _cirtorch_cholesky(S):
    alpha = 0
    while 1:
        try:
            return np.linalg.cholesky(S + alpha * np.eye(*S.shape))
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10


def cirtorch_whitenlearn(X, qidxs, pidxs):
    m = X[:, qidxs].mean(axis=1, keepdims=True)
    df = X[:, qidxs] - X[:, pidxs]
    S = np.dot(df, df.T) / df.shape[1]
    P = np.linalg.inv(_cirtorch_cholesky(S))
    df = np.dot(P, X - m)
    D = np.dot(df, df.T)
    eigval, eigvec = np.linalg.eig(D)
    order = eigval.argsort()[::-1]
    eigvec = eigvec[:, order]
    return m, np.dot(eigvec.T, P)


def cirtorch_pcawhitenlearn(X):
    N = X.shape[1]
    m = X.mean(axis=1, keepdims=True)
    Xc = X - m
    Xcov = np.dot(Xc, Xc.T)
    Xcov = (Xcov + Xcov.T) / (2 * N)
    eigval, eigvec = np.linalg.eig(Xcov)
    order = eigval.argsort()[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    return m, np.dot(np.linalg.inv(np.sqrt(np.diag(eigval))), eigvec.T)


def cirtorch_whitenapply(X, m, P, dimensions=None):
    if not dimensions:
        dimensions = P.shape[0]
    X = np.dot(P[:dimensions, :], X - m)
    return X / (np.linalg.norm(X, ord=2, axis=0, keepdims=True) + 1e-6)


def _data(seed: int = 0, n: int = 400, d: int = 12):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.linspace(0.2, 3.0, d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    k = min(150, n // 2)
    q = rng.choice(n, k, replace=False)
    p = (q + 1) % n
    x[p] = x[q] + 0.1 * rng.standard_normal((k, d))  # positives near their queries
    return x.astype(np.float32), q, p


def _same_up_to_sign(a: np.ndarray, b: np.ndarray) -> None:
    """Eigenvectors are defined up to sign: compare each output dimension after aligning its sign."""
    sign = np.sign((a * b).sum(axis=0))
    np.testing.assert_allclose(a * sign, b, atol=1e-5)


def test_learn_lw_equals_cirtorch_whitenlearn():
    x, q, p = _data()
    lw = learn_lw(x, q, p, source="test")
    m, P = cirtorch_whitenlearn(x.astype(np.float64).T, q, p)
    _same_up_to_sign(lw.apply_np(x), cirtorch_whitenapply(x.astype(np.float64).T, m, P).T)
    np.testing.assert_allclose(lw.m, m.ravel(), atol=1e-6)


def test_learn_pca_equals_cirtorch_pcawhitenlearn():
    x, _, _ = _data(1)
    lw = learn_pca(x, source="test")
    m, P = cirtorch_pcawhitenlearn(x.astype(np.float64).T)
    _same_up_to_sign(lw.apply_np(x), cirtorch_whitenapply(x.astype(np.float64).T, m, P).T)


def test_learn_lw_is_deterministic_and_survives_a_singular_scatter():
    x, q, p = _data(2, n=50, d=64)  # fewer pairs than dimensions: S is singular, alpha I is added
    a = learn_lw(x, q[:20], p[:20], source="test")
    b = learn_lw(x, q[:20], p[:20], source="test")
    np.testing.assert_array_equal(a.P, b.P)
    assert np.isfinite(a.apply_np(x)).all()


def test_whitening_file_round_trip(tmp_path):
    x, q, p = _data(3)
    lw = learn_lw(x, q, p, source="test", key="train", variant="ss")
    path = lw.save(tmp_path / "lw.pt")
    back = Lw.load(path, multiscale=False)
    np.testing.assert_array_equal(back.P, lw.P)
    assert back.key == "train"


def test_aml_whiten_command_writes_a_file_evaluate_applies(run_cli, tmp_path, monkeypatch):
    from aml.data.synth import SynthConfig, generate_synth

    monkeypatch.setenv("AML_HOME", str(tmp_path / "home"))
    data = tmp_path / "synth"
    generate_synth(
        data,
        SynthConfig(
            landmarks=4,
            views=3,
            val_landmarks=1,
            test_landmarks=2,
            queries=2,
            db_views=3,
            distractors=1,
            distractor_views=2,
            size=48,
            seed=5,
        ),
    )
    out = tmp_path / "lw.pt"
    args = ["whiten", "--teacher", "resnet18", "--random-init", "--data", f"synth:{data}", "--image-size", "40"]
    code, stdout, stderr = run_cli(*args, "--out", str(out), "--quiet")
    assert code == 0, stderr
    assert out.is_file() and "Lw" in stdout
    lw = Lw.load(out)
    assert lw.in_dim == 512
    code, _, stderr = run_cli(*args, "--method", "pca", "--out", str(tmp_path / "pca.pt"), "--quiet")
    assert code == 0, stderr
    assert os.path.isfile(tmp_path / "pca.pt")


def test_aml_whiten_without_pairs_says_use_pca(tmp_path):
    from aml.errors import UserError
    from aml.whiten import learn_teacher_lw

    class NoPairs:
        name, qidxs, pidxs = "imgs", np.zeros(0, np.int64), np.zeros(0, np.int64)

    with pytest.raises(UserError, match="--method pca"):
        learn_teacher_lw(np.eye(3, dtype=np.float32), NoPairs(), "lw", key="k")

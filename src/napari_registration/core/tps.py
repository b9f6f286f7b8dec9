"""Thin-plate spline (TPS) transform step, 2D and 3D.

A TPS fitted to paired landmarks ``source[i] -> target[i]`` is

    f(x) = a0 + A x + sum_i w_i phi(|x - source_i|)

with ``phi(r) = r^2 log r`` in 2D and ``phi(r) = -r`` in 3D (the kernels that minimise
bending energy), and the side conditions ``sum w_i = 0``, ``sum w_i source_i = 0``.
With ``regularization = 0`` it interpolates: ``f(source_i) == target_i`` exactly; a
positive value trades that for smoothness (approximating spline).

The step maps the moving side to the fixed side with ``f`` (``direction="forward"``).
The other direction has no closed form: it starts from the reverse spline (fitted
target -> source) and is polished by Newton's method on ``f(x) = p`` with the analytic
Jacobian, so ``forward(backward(p)) == p`` to ~1e-9 world units for fold-free splines.
"""

from __future__ import annotations

import numpy as np

from .transform import Step, register_step

__all__ = ["TpsStep", "fit_tps"]

_CHUNK = 32768  # points per evaluation chunk: bounds the (chunk, N) distance matrix


def _kernel_sq(r2: np.ndarray, ndim: int) -> np.ndarray:
    """phi as a function of the squared distance: r^2 log r = r^2 log(r^2) / 2 (2D),
    -r (3D); 0 at r = 0."""
    if ndim == 2:  # 0 * log(tiny) = 0 at r = 0, without a branch
        return 0.5 * r2 * np.log(np.maximum(r2, 1e-300))
    return -np.sqrt(np.maximum(r2, 0.0))


def _slope_sq(r2: np.ndarray, ndim: int) -> np.ndarray:
    """phi'(r) / r from the squared distance (grad phi(|x - c|) = phi'(r)/r (x - c));
    0 at r = 0, where (x - c) vanishes."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(r2) + 1.0 if ndim == 2 else -1.0 / np.sqrt(r2)
    return np.where(r2 > 0, out, 0.0)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(M, N) squared distances by |x|^2 + |c|^2 - 2 x.c (one matrix product); the
    few near-zero entries, where that expansion loses its digits (and -sqrt would turn
    1e-16 into 1e-8), are recomputed from the differences."""
    r2 = np.maximum((x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2.0 * x @ c.T, 0.0)
    rows, cols = np.nonzero(r2 < 1e-6)
    if rows.size:
        r2[rows, cols] = ((x[rows] - c[cols]) ** 2).sum(1)
    return r2


class _Spline:
    """A fitted spline in normalised coordinates ``(x - centre) / scale``."""

    def __init__(self, source, target, regularization):
        source = np.asarray(source, float)
        target = np.asarray(target, float)
        n, d = source.shape
        self.ndim = d
        self.centre = source.mean(axis=0)
        self.scale = float(np.sqrt(((source - self.centre) ** 2).sum(axis=1).mean())) or 1.0
        c = (source - self.centre) / self.scale
        self.controls = c
        k = _kernel_sq(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), d)
        k = k + float(regularization) * np.eye(n)
        p = np.hstack([np.ones((n, 1)), c])
        system = np.zeros((n + d + 1, n + d + 1))
        system[:n, :n] = k
        system[:n, n:] = p
        system[n:, :n] = p.T
        rhs = np.zeros((n + d + 1, d))
        rhs[:n] = target
        from scipy import linalg

        try:  # symmetric indefinite (LDL^T): ~5x faster than a general LU here
            sol = linalg.solve(system, rhs, assume_a="sym")
        except (np.linalg.LinAlgError, linalg.LinAlgError):
            raise ValueError(
                "the thin-plate spline system is singular: the landmarks are degenerate "
                "(repeated, or all on one line in 2D / one plane in 3D)"
            ) from None
        if not np.all(np.isfinite(sol)):
            raise ValueError("the thin-plate spline fit is not finite: landmarks are degenerate")
        self.weights = sol[:n]          # (N, D)
        self.affine = sol[n:]           # (D+1, D): row 0 offset, rows 1.. linear part

    def __call__(self, points: np.ndarray) -> np.ndarray:
        out = np.empty_like(points, dtype=float)
        for start in range(0, len(points), _CHUNK):
            x = (points[start:start + _CHUNK] - self.centre) / self.scale
            out[start:start + _CHUNK] = (self.affine[0] + x @ self.affine[1:]
                                         + _kernel_sq(_sq_dist(x, self.controls), self.ndim)
                                         @ self.weights)
        return out

    def jacobian(self, points: np.ndarray) -> np.ndarray:
        """(M, D, D) with J[m, k, j] = d f_k / d x_j at points[m] (world units).

        sum_i s_i w_ik (x_j - c_ij) = x_j (S W)_k - (S (w_k * c_j)) with S the (M, N)
        slopes: two matrix products instead of an (M, N, D) array."""
        d = self.ndim
        jac = np.empty((len(points), d, d))
        wc = (self.weights[:, :, None] * self.controls[:, None, :]).reshape(len(self.controls), d * d)
        for start in range(0, len(points), _CHUNK):
            x = (points[start:start + _CHUNK] - self.centre) / self.scale
            slope = _slope_sq(_sq_dist(x, self.controls), d)
            sw = slope @ self.weights                    # (m, D): sum_i s_i w_ik
            swc = (slope @ wc).reshape(len(x), d, d)     # [m, k, j]: sum_i s_i w_ik c_ij
            jac[start:start + _CHUNK] = (sw[:, :, None] * x[:, None, :] - swc
                                         + self.affine[1:].T[None])
        return jac / self.scale


def fit_tps(source, target, regularization: float = 0.0) -> "TpsStep":
    """A :class:`TpsStep` mapping ``source`` points onto ``target`` points."""
    return TpsStep(source, target, regularization)


@register_step
class TpsStep(Step):
    """Thin-plate spline through paired landmarks (moving side ``source`` -> fixed side
    ``target``), in world coordinates. ``direction="backward"`` swaps the two directions
    (what :meth:`inverse` returns)."""

    kind = "tps"

    def __init__(self, source, target, regularization: float = 0.0, direction: str = "forward",
                 *, iterations: int = 30, tol: float = 1e-9, lazy: bool = False):
        source = np.array(source, dtype=float)
        target = np.array(target, dtype=float)
        if source.ndim != 2 or source.shape != target.shape or source.shape[1] not in (2, 3):
            raise ValueError("a thin-plate spline needs paired (N, 2) or (N, 3) source and "
                             f"target points; got {source.shape} and {target.shape}")
        if not (np.all(np.isfinite(source)) and np.all(np.isfinite(target))):
            raise ValueError("thin-plate spline landmarks must be finite numbers")
        n, d = source.shape
        if n < d + 1:
            raise ValueError(f"a {d}D thin-plate spline needs at least {d + 1} landmark pairs; got {n}")
        if direction not in ("forward", "backward"):
            raise ValueError("direction must be 'forward' or 'backward'")
        if float(regularization) < 0:
            raise ValueError(f"regularization must be >= 0; got {regularization}")
        source.setflags(write=False)
        target.setflags(write=False)
        self.source, self.target = source, target
        self.regularization = float(regularization)
        self.direction = direction
        self.ndim = d
        self.iterations = int(iterations)
        self.tol = float(tol)
        # cheap degeneracy check (O(N)): all landmarks on one line (2D) / plane (3D)
        centred = source - source.mean(axis=0)
        sv = np.linalg.svd(centred, compute_uv=False)
        if sv[-1] <= 1e-12 * max(float(sv[0]), 1e-300):
            raise ValueError("the thin-plate spline system is singular: the landmarks are "
                             "degenerate (all on one line in 2D / one plane in 3D)")
        # lazy=True (files): the O(N^3) fit waits for the first use, so loading costs
        # what reading the points costs
        self._f_cache = None if lazy else _Spline(source, target, self.regularization)
        self._g_cache = None
        span = np.ptp(np.vstack([source, target]), axis=0).max()
        self._abs_tol = self.tol * max(float(span), 1.0)

    @property
    def _f(self):
        """The fitted forward spline (source -> target), fitted on first use if lazy."""
        if self._f_cache is None:
            self._f_cache = _Spline(self.source, self.target, self.regularization)
        return self._f_cache

    @property
    def _g(self):
        """The reverse spline (target -> source): the starting guess for f^-1, fitted
        when first needed (warping), not when only the forward map is used."""
        if self._g_cache is None:
            self._g_cache = _Spline(self.target, self.source, self.regularization)
        return self._g_cache

    # ---- the two directions of the fitted spline
    def _direct(self, pts):
        return self._f(pts)

    def _inverted(self, pts):
        """Solve f(x) = p for x: reverse spline as the start, then damped Newton."""
        x = self._g(pts)
        res = self._f(x) - pts
        err = np.linalg.norm(res, axis=1)
        for _ in range(self.iterations):
            active = err > self._abs_tol
            if not active.any():
                break
            xa, ra = x[active], res[active]
            jac = self._f.jacobian(xa)
            try:
                step = np.linalg.solve(jac, ra[..., None])[..., 0]
            except np.linalg.LinAlgError:
                step = np.einsum("mij,mj->mi", np.linalg.pinv(jac), ra)
            new_x = xa - step
            new_res = self._f(new_x) - pts[active]
            new_err = np.linalg.norm(new_res, axis=1)
            worse = ~(new_err < err[active])
            if worse.any():  # halve the step where Newton overshoots (strong bending)
                half = xa[worse] - 0.5 * step[worse]
                half_res = self._f(half) - pts[active][worse]
                half_err = np.linalg.norm(half_res, axis=1)
                new_x[worse], new_res[worse], new_err[worse] = half, half_res, half_err
            idx = np.flatnonzero(active)
            keep = new_err < err[active]
            x[idx[keep]] = new_x[keep]
            res[idx[keep]] = new_res[keep]
            err[idx[keep]] = new_err[keep]
            if not keep.any():
                break
        return x

    def forward(self, points):
        return self._direct(points) if self.direction == "forward" else self._inverted(points)

    def backward(self, points):
        return self._inverted(points) if self.direction == "forward" else self._direct(points)

    def inverse(self):
        other = "backward" if self.direction == "forward" else "forward"
        step = TpsStep(self.source, self.target, self.regularization, other,
                       iterations=self.iterations, tol=self.tol, lazy=True)
        step._f_cache, step._g_cache = self._f_cache, self._g_cache  # same splines
        return step

    def bending_energy(self) -> float:
        """trace(W^T K W) in normalised units: 0 for an affine map, grows with bending."""
        c = self._f.controls
        k = _kernel_sq(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1), self.ndim)
        return float(np.trace(self._f.weights.T @ k @ self._f.weights))

    def to_dict(self):
        return {
            "kind": self.kind,
            "direction": self.direction,
            "regularization": self.regularization,
            "source": self.source.tolist(),
            "target": self.target.tolist(),
        }

    @classmethod
    def from_dict(cls, data):
        return cls(data["source"], data["target"], data.get("regularization", 0.0),
                   data.get("direction", "forward"), lazy=True)

"""Deformable registration by Gauss-Newton on cubic B-spline coefficients (2D and 3D).

The displacement ``u(x) = sum_k c_k beta3(x / h - k + 1)`` (per axis, in pixels of the
fixed grid, control points every ``h`` pixels, one outside each border) is fitted so
that ``gain * moving(x + u(x)) + offset`` matches ``fixed(x)`` in least squares, plus a
bending-energy penalty on ``u``. It runs coarse to fine: each level works on block
means of the images and on a control grid twice as fine as the level before (the
coarse field is carried over exactly: a cubic B-spline on a grid is also one on the
grid of half its spacing), as elastix's default multi-resolution B-spline does.

Everything is separable: the field is ``B0 @ C @ B1.T`` with dense 1D basis matrices,
the gradient ``B0.T @ G @ B1``, and the Gauss-Newton matrix is assembled from the 7 x 7
control-point offsets whose supports overlap, so an iteration costs a few small matrix
products and one sparse solve. Moving samples and gradients come from the image's
cubic spline (:func:`core.refine.spline_gradient_from_coefficients`).

:func:`register_bspline_3d` is the same model for volumes (voxel spacing honoured in the
penalty), solving each step's normal equations matrix-free by conjugate gradients.

Pure numpy/scipy: no napari, Qt, OpenCV or SimpleITK.
"""

from __future__ import annotations

import time

import numpy as np

from .refine import _block_mean, spline_gradient_from_coefficients
from .register import RegistrationCancelled


def _beta3(t: np.ndarray) -> np.ndarray:
    a = np.abs(t)
    out = np.zeros_like(a)
    near = a < 1
    far = (a >= 1) & (a < 2)
    out[near] = 2.0 / 3.0 - a[near] ** 2 + 0.5 * a[near] ** 3
    out[far] = (2.0 - a[far]) ** 3 / 6.0
    return out


def n_coefficients(n: int, h: float) -> int:
    """Control points along an axis of ``n`` pixels with spacing ``h`` (one outside each
    border, so every pixel has its four)."""
    return int(np.ceil((n - 1) / h - 1e-9)) + 3


def basis(positions: np.ndarray, h: float, m: int) -> np.ndarray:
    """(len(positions), m) weights: column k is ``beta3(p / h - k + 1)``."""
    t = np.asarray(positions, float)[:, None] / h - (np.arange(m)[None, :] - 1.0)
    return _beta3(t)


def _sparse(b):
    from scipy import sparse

    return sparse.csr_matrix(b)


def field_from_coefficients(coeffs: np.ndarray, bases) -> np.ndarray:
    """Displacement (n0, n1, 2) from coefficients (m0, m1, 2) and the two basis matrices
    (dense or scipy sparse; products go through scipy.sparse, not BLAS: on a shared
    machine OpenBLAS's threads made these small products 7x slower)."""
    b0, b1 = (_sparse(b) for b in bases)
    out = []
    for d in range(coeffs.shape[-1]):
        t = b0 @ coeffs[..., d]                 # (n0, m1)
        out.append((b1 @ t.T).T)                # (n0, n1)
    return np.stack(out, axis=-1)


def _project(image: np.ndarray, bases) -> np.ndarray:
    """B0.T @ image @ B1 (sparse bases): the gradient of a field's coefficients."""
    b0, b1 = bases
    t = (b0.T @ image)                          # (m0, n1)
    return (b1.T @ t.T).T                       # (m0, m1)


_HALVE = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 8.0


def _refine_half(coeffs: np.ndarray, shape) -> np.ndarray:
    """Exact coefficients, on a grid of half the spacing, of the same cubic B-spline:
    beta3(t) = sum_i w_i beta3(2 t - i), w = (1, 4, 6, 4, 1) / 8, i = -2..2, so coarse
    control k feeds fine controls 2k - 1 + i (those outside ``shape`` have no support
    inside the image)."""
    out = coeffs
    for axis, m_f in enumerate(shape):
        m_c = out.shape[axis]
        moved = np.moveaxis(out, axis, 0)
        fine = np.zeros((max(2 * m_c + 5, m_f + 3),) + moved.shape[1:])
        for i, w in zip(range(-2, 3), _HALVE):
            fine[2 * np.arange(m_c) + i + 2] += w * moved      # fine index + 3
        out = np.moveaxis(fine[3:3 + m_f], 0, axis)
    return out


def _fit_coefficients(field: np.ndarray, bases) -> np.ndarray:
    """Least-squares coefficients of a field sampled at the bases' positions."""
    p0, p1 = (np.linalg.pinv(np.asarray(b)) for b in bases)
    return np.stack([p0 @ field[..., d] @ p1.T for d in range(field.shape[-1])], axis=-1)


def _bending_matrix(shape):
    """Discrete bending energy of one displacement component on a control grid of
    ``shape``: sum of squared second differences along each axis and twice the squared
    mixed differences (per unit of control spacing)."""
    from scipy import sparse

    def d2(m):
        if m < 3:
            return sparse.csr_matrix((0, m))
        return sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(m - 2, m))

    def d1(m):
        return sparse.diags([-1.0, 1.0], [0, 1], shape=(m - 1, m))

    m0, m1 = shape
    i0, i1 = sparse.identity(m0), sparse.identity(m1)
    a = sparse.kron(d2(m0), i1)
    b = sparse.kron(i0, d2(m1))
    c = sparse.kron(d1(m0), d1(m1))
    return (a.T @ a + b.T @ b + 2.0 * (c.T @ c)).tocsr()


def _membrane_matrix(shape):
    """Discrete membrane energy (squared first differences along each axis) of one
    displacement component on a control grid of ``shape``."""
    from scipy import sparse

    def d1(m):
        return sparse.diags([-1.0, 1.0], [0, 1], shape=(m - 1, m))

    m0, m1 = shape
    a = sparse.kron(d1(m0), sparse.identity(m1))
    b = sparse.kron(sparse.identity(m0), d1(m1))
    return (a.T @ a + b.T @ b).tocsr()


class _Hessian:
    """Gauss-Newton matrix ``sum_x w J^T J`` of both components' coefficients for one
    level's bases; the sparsity pattern and its CSC order are made once per level."""

    OFFS = tuple(range(-3, 4))

    def __init__(self, bases, shape):
        from scipy import sparse

        b0, b1 = (np.asarray(b.toarray() if hasattr(b, "toarray") else b) for b in bases)
        m0, m1 = shape
        self.n_c = n_c = m0 * m1
        idx = np.arange(n_c).reshape(m0, m1)

        def products(b, m):
            out = {}
            for d in self.OFFS:
                q = np.zeros_like(b)
                lo, hi = max(0, -d), min(m, m - d)
                q[:, lo:hi] = b[:, lo:hi] * b[:, lo + d:hi + d]
                out[d] = sparse.csr_matrix(q.T)   # (m, n): k -> b_k b_{k+d}
            return out

        self.q0, self.q1 = products(b0, m0), products(b1, m1)
        self.slices = {}
        rows, cols = [], []
        for a, b in ((0, 0), (0, 1), (1, 1)):
            for d0 in self.OFFS:
                lo0, hi0 = max(0, -d0), min(m0, m0 - d0)
                for d1 in self.OFFS:
                    lo1, hi1 = max(0, -d1), min(m1, m1 - d1)
                    r = idx[lo0:hi0, lo1:hi1]
                    c = idx[lo0 + d0:hi0 + d0, lo1 + d1:hi1 + d1]
                    rows.append((r + a * n_c).ravel())
                    cols.append((c + b * n_c).ravel())
                    if a != b:
                        rows.append((c + b * n_c).ravel())
                        cols.append((r + a * n_c).ravel())
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        order = sparse.csc_matrix((np.arange(1, rows.size + 1, dtype=float), (rows, cols)),
                                  shape=(2 * n_c, 2 * n_c))
        self.pattern = order
        self.perm = order.data.astype(np.int64) - 1

    def __call__(self, weights, grads):
        vals = []
        for a, b in ((0, 0), (0, 1), (1, 1)):
            dmat = weights * grads[a] * grads[b]
            for d0 in self.OFFS:
                t = self.q0[d0] @ dmat                      # (m0, n1)
                lo0, hi0 = max(0, -d0), min(t.shape[0], t.shape[0] - d0)
                for d1 in self.OFFS:
                    e = (self.q1[d1] @ t.T).T               # (m0, m1)
                    lo1, hi1 = max(0, -d1), min(e.shape[1], e.shape[1] - d1)
                    v = e[lo0:hi0, lo1:hi1].ravel()
                    vals.append(v)
                    if a != b:
                        vals.append(v)
        h = self.pattern.copy()
        h.data = np.concatenate(vals)[self.perm]
        return h


def _solve(a, b):
    """Solve the damped normal equations (symmetric positive definite): conjugate
    gradients with a Jacobi preconditioner to 1e-4 relative residual for 800 unknowns
    or more (a step need not be exact: the energy test accepts or rejects it; 2.5x
    faster than SuperLU at ~1000 unknowns, 1e-5 relative difference), SuperLU below
    that or when CG does not converge."""
    from scipy.sparse.linalg import LinearOperator, cg, splu

    if a.shape[0] < 800:
        # smaller systems: SuperLU was as fast or faster (stereo, 630 unknowns: 1.38 s
        # engine with SuperLU, 1.54 s with CG; camera, 968: 2.90 s vs 2.24 s)
        return splu(a.tocsc(), permc_spec="MMD_AT_PLUS_A").solve(b)
    d = a.diagonal()
    d = np.where(d > 0, d, 1.0)
    pre = LinearOperator(a.shape, matvec=lambda v: v / d)
    try:
        x, info = cg(a, b, rtol=1e-4, maxiter=4 * a.shape[0], M=pre)
    except TypeError:  # scipy < 1.12 calls it tol
        x, info = cg(a, b, tol=1e-4, maxiter=4 * a.shape[0], M=pre)
    if info == 0 and np.all(np.isfinite(x)):
        return x
    return splu(a.tocsc(), permc_spec="MMD_AT_PLUS_A").solve(b)


def _levels(shape, final_spacing, n_levels, min_side):
    """(image factor, control spacing in full-resolution pixels per axis) coarse to fine."""
    out = []
    for k in range(n_levels):
        f = 2 ** (n_levels - 1 - k)
        while f > 1 and min(shape) / f < min_side:
            f //= 2
        out.append((f, np.asarray(final_spacing, float) * 2 ** (n_levels - 1 - k)))
    return out


def register_bspline(fixed, moving, *, valid=None, grid_spacing=(14.0, 14.0), levels: int = 4,
                     regularization: float = 0.05, stiffness: float = 1e-3, iterations: int = 20,
                     tolerance: float = 0.01, energy_tolerance: float = 0.0,
                     coarse_energy_tolerance: float = 0.002,
                     min_side: int = 24, step_budget: int | None = 2 ** 20,
                     min_iterations: int = 5,
                     robust: bool = True, fixed_mask=None,
                     progress=None, cancel=None) -> tuple[np.ndarray, dict]:
    """Fit a cubic B-spline displacement so that ``moving(x + u(x)) ~ fixed(x)``.

    Parameters
    ----------
    fixed, moving : (n0, n1) arrays on the same grid (e.g. the moving image already
        resampled through a linear stage); compared up to a gain and an offset.
    valid : bool array or None
        Pixels of ``moving`` that hold data (samples that land outside do not count);
        None: all.
    fixed_mask : bool array or None
        Pixels of ``fixed`` that count; None: all.
    grid_spacing : float or (float, float)
        Control-point spacing at the finest level, in pixels; each coarser level doubles it.
    levels : int
        Resolution levels (images block-averaged by 2**k, at least ``min_side`` pixels).
    step_budget, min_iterations : int or None, int
        A level of P pixels runs at most ``max(min_iterations, step_budget // P)`` steps
        (and at most ``iterations``): each step costs in proportion to the pixels, and a
        fine level starts from the level below, already close. 2**20: stereo (41k px)
        keeps its 20 steps, camera 256^2 16, 512^2 5 (512^2 camera, 24 px grid: 6.1 ->
        2.0 s, median error 0.019 -> 0.021 px; block-averaging that level instead cost
        7x in median error, 0.139 px).
    regularization : float
        Weight of the bending energy (the data term is the mean squared residual over
        the fixed image's variance; the energy is per pixel in pixel units).
    stiffness : float
        Weight of the membrane energy (squared first derivatives, same units): holds the
        field where the images are flat, where bending energy alone lets it drift
        linearly (camera's sky: 5.8 px off at one point without it).
    iterations : int
        At most this many Gauss-Newton steps per level.
    tolerance : float
        A level stops when a step moves no pixel by more than this many pixels.
    energy_tolerance, coarse_energy_tolerance : float
        ... or when a step lowers the energy by less than this fraction, on the finest
        level and on the others (0: off). Coarse levels need not converge tightly: 0.002
        there saved 9 of 49 steps on camera_deformable (TRE 0.217 -> 0.196 px) and left
        stereo_motorcycle unchanged (1.700 px); on the finest level stereo needs the steps
        (0.002 there: 1.76 -> 1.80 px).
    robust : bool
        Reweight residuals with Tukey's biweight (4.685 robust standard deviations)
        from the second level on, so that occlusions and unmatched parts stop pulling.

    Returns
    -------
    (field, info): the displacement (n0, n1, 2) in pixels, ``fixed`` grid, and a record
    (levels, iterations per level, grid shapes, final RMS residual, seconds).
    """
    from scipy import ndimage, sparse

    t_start = time.perf_counter()
    fixed = np.asarray(fixed, np.float64)
    moving = np.asarray(moving, np.float64)
    if fixed.ndim != 2 or fixed.shape != moving.shape:
        raise ValueError("register_bspline needs two 2D images of the same shape; got "
                         f"{fixed.shape} and {moving.shape}")
    valid = np.ones(fixed.shape, bool) if valid is None else np.asarray(valid, bool)
    fmask = np.ones(fixed.shape, bool) if fixed_mask is None else np.asarray(fixed_mask, bool)
    if valid.shape != fixed.shape or fmask.shape != fixed.shape:
        raise ValueError("valid and fixed_mask must have the images' shape "
                         f"{fixed.shape}; got {valid.shape} and {fmask.shape}")
    spacing = np.broadcast_to(np.asarray(grid_spacing, float), (2,))
    if not np.all(np.isfinite(spacing)) or np.any(spacing < 1):
        raise ValueError(f"grid_spacing must be at least one pixel; got {spacing.tolist()}")
    progress = progress or (lambda f, m: None)
    cancel = cancel or (lambda: False)

    sched = _levels(fixed.shape, spacing, max(1, int(levels)), min_side)
    coeffs = None
    prev_h = None
    info = {"levels": [], "iterations": [], "grid_shapes": [], "seconds": 0.0}
    rms = None
    for li, (f, h) in enumerate(sched):
        fl = _block_mean(fixed, f).astype(np.float64)
        ml = _block_mean(moving, f).astype(np.float64)
        vl = _block_mean(valid.astype(np.float32), f) > 0.999
        fm = _block_mean(fmask.astype(np.float32), f) > 0.5
        nl = fl.shape
        # level pixel i is the centre of full-resolution pixels f*i .. f*i + f - 1
        pos = [f * np.arange(n) + (f - 1) / 2.0 for n in nl]
        mshape = tuple(n_coefficients(fixed.shape[a], h[a]) for a in range(2))
        bases = [_sparse(basis(pos[a], h[a], mshape[a])) for a in range(2)]
        hessian = _Hessian(bases, mshape)
        if coeffs is None:
            coeffs = np.zeros(mshape + (2,))
        elif np.allclose(prev_h, 2 * h) and all(2 * c + 2 >= m for c, m in zip(coeffs.shape, mshape)):
            coeffs = _refine_half(coeffs, mshape)
        else:
            # carry the coarser field over: fit it on the full-resolution pixel grid
            full = [np.arange(n, dtype=float) for n in fixed.shape]
            old = field_from_coefficients(coeffs, [basis(full[a], prev_h[a], coeffs.shape[a])
                                                   for a in range(2)])
            coeffs = _fit_coefficients(old, [basis(full[a], h[a], mshape[a]) for a in range(2)])
        prev_h = h
        sd = float(fl[fm].std()) if fm.any() else float(fl.std())
        scale = 1.0 / max(sd * sd, 1e-12)
        mc = ndimage.spline_filter(ml, order=3, mode="mirror")
        # the gradient at warped positions: cubic interpolation of the spline's exact
        # gradient at the pixels (measured against the fixed image's gradient, their
        # mean (ESM) and linear interpolation: those converged to worse fields)
        gc = [ndimage.spline_filter(g, order=3, mode="mirror")
              for g in spline_gradient_from_coefficients(mc)]
        all_valid = bool(vl.all())
        grid = np.indices(nl).astype(np.float64)
        n_c = mshape[0] * mshape[1]
        # bending energy of the field in pixel units per pixel: coefficient differences
        # over h^2 per second derivative, times the area one control point stands for
        bend = _bending_matrix(mshape)
        area = float(np.prod(nl)) * f * f
        wb = regularization * float(h[0] * h[1]) / (float(np.mean(h)) ** 4) / area
        # bending energy has the affine fields as its null space: where the images are
        # flat (camera's sky) a field could drift linearly at no cost; a weak membrane
        # term (first derivatives) holds it
        memb = _membrane_matrix(mshape)
        wm = stiffness * float(h[0] * h[1]) / (float(np.mean(h)) ** 2) / area
        reg = (sparse.block_diag([bend, bend]) * wb + sparse.block_diag([memb, memb]) * wm).tocsc()
        lam = 1e-3
        its = 0
        weights_robust = None

        def evaluate(c):
            u = field_from_coefficients(c, bases)
            q = grid + np.moveaxis(u, -1, 0) / f
            mw = ndimage.map_coordinates(mc, q, order=3, mode="mirror", prefilter=False)
            # a sample counts when the four pixels around it hold data
            lo = np.floor(q).astype(np.intp)
            inside = fm.copy()
            for a in range(2):
                inside &= (lo[a] >= 0) & (lo[a] < nl[a] - 1)
            i0 = np.clip(lo[0], 0, nl[0] - 2)
            i1 = np.clip(lo[1], 0, nl[1] - 2)
            if not all_valid:
                inside &= (vl[i0, i1] & vl[i0 + 1, i1] & vl[i0, i1 + 1] & vl[i0 + 1, i1 + 1])
            return u, q, mw, inside

        def energy(c, mw, inside, wrob):
            w = inside.astype(np.float64) if wrob is None else inside * wrob
            sw = max(float(w.sum()), 1.0)
            # gain and offset by weighted least squares
            a_, b_ = _gain_offset(mw, fl, w)
            r = a_ * mw + b_ - fl
            flat = np.concatenate([c[..., 0].ravel(), c[..., 1].ravel()])
            e = float((w * r * r).sum()) / sw * scale + float(flat @ (reg @ flat))
            return e, r, w, sw, a_

        u, q, mw, inside = evaluate(coeffs)
        e, r, w, sw, gain = energy(coeffs, mw, inside, None)
        n_it = int(iterations)
        if step_budget:
            n_it = min(n_it, max(int(min_iterations), int(step_budget // int(np.prod(nl)))))
        for it in range(n_it):
            if cancel():
                raise RegistrationCancelled("registration cancelled")
            if robust and li > 0:
                sigma = 1.4826 * float(np.median(np.abs(r[inside]))) if inside.any() else 0.0
                if sigma > 0:
                    z = r / (4.685 * sigma)
                    weights_robust = np.where(np.abs(z) < 1, (1 - z * z) ** 2, 0.0)
                    e, r, w, sw, gain = energy(coeffs, mw, inside, weights_robust)
            g = [gain * ndimage.map_coordinates(gc[a], q, order=3, mode="mirror",
                                                prefilter=False) / f for a in range(2)]
            wr = w * r * scale / sw
            grad = np.concatenate([_project(wr * g[a], bases).ravel() for a in range(2)])
            flat = np.concatenate([coeffs[..., 0].ravel(), coeffs[..., 1].ravel()])
            grad = grad + reg @ flat
            hess = hessian(w * scale / sw, g) + reg
            diag = hess.diagonal()
            accepted = False
            for _ in range(6):
                damp = sparse.diags(lam * (diag + 1e-12 * max(diag.max(), 1e-30)))
                step = -_solve((hess + damp).tocsr(), grad)
                new = coeffs + np.stack([step[:n_c].reshape(mshape), step[n_c:].reshape(mshape)], -1)
                u2, q2, mw2, inside2 = evaluate(new)
                e2, r2, w2, sw2, gain2 = energy(new, mw2, inside2, weights_robust)
                if e2 < e:
                    accepted = True
                    break
                lam *= 10.0
            its += 1
            if not accepted:
                break
            lam = max(lam / 10.0, 1e-6)
            moved = float(np.abs(u2 - u).max())
            gain_e = (e - e2) / max(e, 1e-30)
            coeffs, u, q, mw, inside = new, u2, q2, mw2, inside2
            e, r, w, sw, gain = e2, r2, w2, sw2, gain2
            progress((li + (it + 1) / n_it) / len(sched),
                     f"bspline: level {li + 1}/{len(sched)}, iteration {it + 1}, "
                     f"energy {e:.5g}")
            last = li == len(sched) - 1
            if moved < tolerance or gain_e < (energy_tolerance if last else coarse_energy_tolerance):
                break
        rms = float(np.sqrt((w * r * r).sum() / sw))
        info["levels"].append(int(f))
        info["iterations"].append(its)
        info["grid_shapes"].append([int(m) - 3 for m in mshape])
    full = [np.arange(n, dtype=float) for n in fixed.shape]
    field = field_from_coefficients(coeffs, [basis(full[a], prev_h[a], coeffs.shape[a])
                                             for a in range(2)])
    info["rms"] = rms
    info["seconds"] = time.perf_counter() - t_start
    return field, info


def _gain_offset(mw, fl, w):
    sw = float(w.sum())
    if sw <= 0:
        return 1.0, 0.0
    mm = float((w * mw).sum()) / sw
    mf = float((w * fl).sum()) / sw
    dm = mw - mm
    var = float((w * dm * dm).sum())
    if var <= 1e-12:
        return 1.0, mf - mm
    a = float((w * dm * (fl - mf)).sum()) / var
    return a, mf - a * mm


# ------------------------------------------------------------------------------- 3D
def _along(arr: np.ndarray, mat, axis: int) -> np.ndarray:
    """``mat`` (scipy sparse, (p, n)) applied along ``axis`` of ``arr`` (length n there)."""
    if axis == 0:
        sh = arr.shape
        return (mat @ arr.reshape(sh[0], -1)).reshape((mat.shape[0],) + sh[1:])
    if axis == arr.ndim - 1:
        sh = arr.shape
        return (mat @ arr.reshape(-1, sh[-1]).T).T.reshape(sh[:-1] + (mat.shape[0],))
    moved = np.moveaxis(arr, axis, 0)
    sh = moved.shape
    out = (mat @ moved.reshape(sh[0], -1)).reshape((mat.shape[0],) + sh[1:])
    return np.moveaxis(out, 0, axis)


def _tensor(arr: np.ndarray, mats) -> np.ndarray:
    """``arr`` with one matrix applied along each axis (the separable tensor product)."""
    out = arr
    for axis, m in enumerate(mats):
        out = _along(out, m, axis)
    return np.ascontiguousarray(out)


def _kron_axis(ops, shape):
    """Sparse operators ``ops`` ({axis: matrix on that axis}) on the raveled grid
    ``shape`` (identity along the other axes)."""
    from scipy import sparse

    out = None
    for a, m in enumerate(shape):
        f = ops[a] if a in ops else sparse.identity(m, format="csr")
        out = f if out is None else sparse.kron(out, f, format="csr")
    return out


def _regularizer_nd(shape, h, r, regularization, stiffness, volume):
    """Bending (second derivatives, mixed ones twice) and membrane (first derivatives)
    energies of a field on a control grid of ``shape`` with control spacing ``h``
    (pixels) on pixels of relative size ``r`` per axis (world units over their
    geometric mean), per unit of image volume ``volume`` (same relative units): one
    sparse matrix on all components' coefficients (component a counts with r_a^2)."""
    from scipy import sparse

    nd = len(shape)
    step = np.asarray(h, float) * np.asarray(r, float)          # control spacing, world

    def d2(m):
        if m < 3:
            return sparse.csr_matrix((0, m))
        return sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(m - 2, m), format="csr")

    def d1(m):
        return sparse.diags([-1.0, 1.0], [0, 1], shape=(m - 1, m), format="csr")

    cell = float(np.prod(step)) / volume
    bend = None
    memb = None
    for i in range(nd):
        a = _kron_axis({i: d2(shape[i])}, shape) / step[i] ** 2
        t = a.T @ a
        bend = t if bend is None else bend + t
        for j in range(i + 1, nd):
            c = _kron_axis({i: d1(shape[i]), j: d1(shape[j])}, shape) / (step[i] * step[j])
            bend = bend + 2.0 * (c.T @ c)
        b = _kron_axis({i: d1(shape[i])}, shape) / step[i]
        memb = b.T @ b if memb is None else memb + b.T @ b
    one = (regularization * bend + stiffness * memb) * cell
    return sparse.block_diag([one * float(ra) ** 2 for ra in r]).tocsr()


def _map_slabs(image, q, order, workers):
    """``ndimage.map_coordinates`` (mirror, prefiltered) of ``q`` (D, n0, ...) in slabs
    along n0 on ``workers`` threads (ndimage releases the GIL; the same values)."""
    from scipy import ndimage

    from .parallel import run_all, split

    n0 = q.shape[1]
    if workers <= 1 or n0 < 2 * workers:
        return ndimage.map_coordinates(image, q, order=order, mode="mirror", prefilter=False)
    out = np.empty(q.shape[1:])

    def part(lo, hi):
        return lambda: ndimage.map_coordinates(image, q[:, lo:hi], order=order, mode="mirror",
                                               prefilter=False, output=out[lo:hi])

    run_all([part(lo, hi) for lo, hi in split(n0, workers)])
    return out


def register_bspline_3d(fixed, moving, *, valid=None, grid_spacing=(6.0, 6.0, 6.0),
                        spacing=(1.0, 1.0, 1.0), levels: int = 4,
                        regularization: float = 0.05, stiffness: float = 1e-3,
                        iterations: int = 20, tolerance: float = 0.01,
                        energy_tolerance: float = 0.0, coarse_energy_tolerance: float = 0.002,
                        min_side: int = 12, step_budget: int | None = 2 ** 21,
                        min_iterations: int = 4, cg_iterations: int = 5, cg_tolerance: float = 1e-2,
                        gradient_order: int = 1,
                        robust: bool = False, fixed_mask=None, moving_affine=None,
                        threads: int = 0, progress=None, cancel=None) -> tuple[np.ndarray, dict]:
    """The 3D counterpart of :func:`register_bspline` (same model, levels, gain/offset,
    Tukey weights, bending + membrane penalty), for volumes.

    In 3D a control point's coefficients couple with 7^3 neighbours per component, so
    the Gauss-Newton matrix is not assembled (on a 116 x 94 x 65 volume with a 6-voxel
    grid it would hold ~10^7 entries): each step solves the damped normal equations by
    conjugate gradients whose matrix-vector product goes through the separable field
    (``J v`` is the field of coefficients ``v`` times the image gradient, ``J^T r`` the
    projection of ``r`` back), with a Jacobi preconditioner (the diagonal is separable
    too). Memory stays a few volume-sized arrays.

    ``moving_affine`` (4 x 4, or None: identity) maps a fixed voxel index to a moving
    voxel index: the moving volume is then sampled at ``A (x + u(x))`` on its own grid
    (any shape; ``valid`` is on that grid) instead of being resampled through a linear
    stage first, which would interpolate it twice (brain_deformable_3d through
    ``register``: 1.124 mm with the resampled volume, 1.064 mm this way).

    ``threads``: image samples are interpolated in slabs on this many threads (0: the
    cores this process may use).

    ``spacing`` is the voxel size (world units per axis): the penalty is on the field in
    world units, so an anisotropic volume is smoothed alike in every direction.
    ``grid_spacing`` is in voxels per axis at the finest level. Returns (field in voxels
    per axis, on the fixed grid; info) like :func:`register_bspline`.

    Defaults that differ from 2D, measured on brain_deformable_3d (MNI T1 3x2x2 mm,
    63 x 117 x 99, grid (4, 6, 6) voxels, one run each on a loaded machine, CPU s):

    - ``gradient_order=1``: the moving image's gradient at the warped points by linear
      interpolation of its spline gradient (order 3: TRE 1.185 mm, 21.4 s; order 1:
      1.072 mm, 17.7 s), the warped image itself stays cubic.
    - ``cg_iterations=5`` (CG to ``cg_tolerance`` or this many products; 20: 1.072 mm,
      17.7 s; 10: 1.044 mm, 14.1 s; 5: 1.022 mm, 8.7 s, coarse levels then take more
      but cheaper steps): an inexact step is tested by the energy anyway.
    - ``robust=False``: Tukey's scale is the residuals' median absolute value, and on a
      volume whose background is mostly empty (both images 0) that median is ~0, so the
      weights drop every voxel with a residual (TRE 2.88 mm with it).
    - ``min_side=12``: a 63-slice volume gets block factors 4, 4, 2, 1 (16: 2, 2, 2, 1,
      1.179 mm at 33 s).
    - ``stiffness`` as in 2D (1e-4: 1.202 mm), ``regularization`` as in 2D (0.01: 1.186).
    """
    from scipy import ndimage, sparse
    from scipy.sparse.linalg import LinearOperator, cg

    t_start = time.perf_counter()
    fixed = np.asarray(fixed, np.float64)
    moving = np.asarray(moving, np.float64)
    if fixed.ndim != 3 or moving.ndim != 3 or (moving_affine is None and fixed.shape != moving.shape):
        raise ValueError("register_bspline_3d needs two 3D volumes of the same shape (or a "
                         f"moving_affine); got {fixed.shape} and {moving.shape}")
    nd = 3
    aff = None
    if moving_affine is not None:
        aff = np.asarray(moving_affine, float)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise ValueError(f"moving_affine must be a finite invertible 4 x 4 matrix; got {aff.shape}")
    valid = np.ones(moving.shape, bool) if valid is None else np.asarray(valid, bool)
    fmask = np.ones(fixed.shape, bool) if fixed_mask is None else np.asarray(fixed_mask, bool)
    if valid.shape != moving.shape or fmask.shape != fixed.shape:
        raise ValueError("valid and fixed_mask must have the moving and fixed volumes' shapes "
                         f"{moving.shape} and {fixed.shape}; got {valid.shape} and {fmask.shape}")
    hs = np.broadcast_to(np.asarray(grid_spacing, float), (nd,)).copy()
    if not np.all(np.isfinite(hs)) or np.any(hs < 1):
        raise ValueError(f"grid_spacing must be at least one voxel; got {hs.tolist()}")
    sp = np.broadcast_to(np.asarray(spacing, float), (nd,)).copy()
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be positive; got {sp.tolist()}")
    rel = sp / float(np.exp(np.mean(np.log(sp))))
    from .parallel import n_workers

    workers = n_workers(threads)
    progress = progress or (lambda f, m: None)
    cancel = cancel or (lambda: False)

    sched = _levels(fixed.shape, hs, max(1, int(levels)), min_side)
    coeffs = None
    prev_h = None
    info = {"levels": [], "iterations": [], "grid_shapes": [], "seconds": 0.0, "cg": []}
    rms = None
    for li, (f, h) in enumerate(sched):
        fl = _block_mean(fixed, f).astype(np.float64)
        ml = _block_mean(moving, f).astype(np.float64)
        vl = _block_mean(valid.astype(np.float32), f) > 0.999
        fm = _block_mean(fmask.astype(np.float32), f) > 0.5
        nl = fl.shape
        nm = ml.shape
        pos = [f * np.arange(n) + (f - 1) / 2.0 for n in nl]
        mshape = tuple(n_coefficients(fixed.shape[a], h[a]) for a in range(nd))
        dense = [basis(pos[a], h[a], mshape[a]) for a in range(nd)]
        fwd = [sparse.csr_matrix(b) for b in dense]                # (n, m)
        back = [sparse.csr_matrix(b.T) for b in dense]             # (m, n)
        back_sq = [sparse.csr_matrix((b * b).T) for b in dense]
        if coeffs is None:
            coeffs = np.zeros(mshape + (nd,))
        elif np.allclose(prev_h, 2 * h) and all(2 * c + 2 >= m for c, m in zip(coeffs.shape, mshape)):
            coeffs = _refine_half(coeffs, mshape)
        else:
            full = [np.arange(n, dtype=float) for n in fixed.shape]
            old_b = [sparse.csr_matrix(basis(full[a], prev_h[a], coeffs.shape[a])) for a in range(nd)]
            pinv = [sparse.csr_matrix(np.linalg.pinv(basis(full[a], h[a], mshape[a]))) for a in range(nd)]
            coeffs = np.stack([_tensor(_tensor(coeffs[..., d], old_b), pinv) for d in range(nd)], -1)
        prev_h = h
        sd = float(fl[fm].std()) if fm.any() else float(fl.std())
        scale = 1.0 / max(sd * sd, 1e-12)
        mc = ndimage.spline_filter(ml, order=3, mode="mirror")
        gp = spline_gradient_from_coefficients(mc)
        gc = [ndimage.spline_filter(g, order=3, mode="mirror") for g in gp] if gradient_order == 3 else None
        all_valid = bool(vl.all())
        if not all_valid:
            vok = vl[:-1, :-1, :-1].copy()
            for corner in np.ndindex(2, 2, 2):
                if any(corner):
                    vok &= vl[tuple(slice(c, c + n - 1) for c, n in zip(corner, nm))]
        ramps = [np.arange(n, dtype=np.float64).reshape([-1 if k == a else 1 for k in range(nd)])
                 for a, n in enumerate(nl)]
        n_c = int(np.prod(mshape))
        volume = float(np.prod(fixed.shape)) * float(np.prod(rel))
        reg = _regularizer_nd(mshape, h, rel, regularization, stiffness, volume)
        lam = 1e-3
        its = 0
        cg_its = []
        weights_robust = None

        def field_of(c):
            return np.stack([_tensor(c[..., d], fwd) for d in range(nd)], axis=-1)

        def evaluate(c):
            u = field_of(c)
            # sample positions in the moving volume's level grid, built axis by axis
            # from 1D index ramps (no volume-sized index grids: 3D peak memory)
            q = np.empty((nd,) + nl)
            if aff is None:
                for a in range(nd):
                    np.add(ramps[a], u[..., a] / f, out=q[a])
            else:
                # fixed full-resolution voxel f i + (f - 1) / 2 + u, through the affine
                half = (f - 1) / 2.0
                for b in range(nd):
                    q[b] = aff[b, :nd].sum() * half + aff[b, nd] - half
                    for a in range(nd):
                        q[b] += aff[b, a] * (f * ramps[a] + u[..., a])
                    q[b] /= f
            mw = _map_slabs(mc, q, 3, workers)
            inside = fm.copy()
            for a in range(nd):
                lo = np.floor(q[a])
                inside &= (lo >= 0) & (lo < nm[a] - 1)
            if not all_valid:
                idx = tuple(np.clip(np.floor(q[a]).astype(np.intp), 0, nm[a] - 2) for a in range(nd))
                inside &= vok[idx]
            return u, q, mw, inside

        def energy(c, mw, inside, wrob):
            w = inside.astype(np.float64) if wrob is None else inside * wrob
            sw = max(float(w.sum()), 1.0)
            a_, b_ = _gain_offset(mw, fl, w)
            r = a_ * mw + b_ - fl
            flat = np.moveaxis(c, -1, 0).ravel()
            e = float((w * r * r).sum()) / sw * scale + float(flat @ (reg @ flat))
            return e, r, w, sw, a_

        u, q, mw, inside = evaluate(coeffs)
        e, r, w, sw, gain = energy(coeffs, mw, inside, None)
        n_it = int(iterations)
        if step_budget:
            n_it = min(n_it, max(int(min_iterations), int(step_budget // int(np.prod(nl)))))
        for it in range(n_it):
            if cancel():
                raise RegistrationCancelled("registration cancelled")
            if robust and li > 0:
                sigma = 1.4826 * float(np.median(np.abs(r[inside]))) if inside.any() else 0.0
                if sigma > 0:
                    z = r / (4.685 * sigma)
                    weights_robust = np.where(np.abs(z) < 1, (1 - z * z) ** 2, 0.0)
                    e, r, w, sw, gain = energy(coeffs, mw, inside, weights_robust)
            g = [gain * _map_slabs(gc[a] if gradient_order == 3 else gp[a], q, gradient_order,
                                   workers) / f for a in range(nd)]
            if aff is not None:
                # d m(A (x + u)) / d u_a = sum_b A[b, a] dm/dq_b
                g = [sum(aff[b, a] * g[b] for b in range(nd)) for a in range(nd)]
            ws = w * scale / sw
            flat = np.moveaxis(coeffs, -1, 0).ravel()
            grad = np.concatenate([_tensor(ws * r * g[a], back).ravel() for a in range(nd)])
            grad = grad + reg @ flat
            diag = np.concatenate([_tensor(ws * g[a] * g[a], back_sq).ravel()
                                   for a in range(nd)]) + reg.diagonal()

            def jtwj(v):
                s = np.zeros(nl)
                for a in range(nd):
                    s += g[a] * _tensor(v[a * n_c:(a + 1) * n_c].reshape(mshape), fwd)
                s *= ws
                return np.concatenate([_tensor(s * g[a], back).ravel() for a in range(nd)])

            accepted = False
            for _ in range(6):
                dd = diag + lam * (diag + 1e-12 * max(diag.max(), 1e-30))
                op = LinearOperator((nd * n_c,) * 2, dtype=np.float64,
                                    matvec=lambda v, dd=dd: jtwj(v) + reg @ v + (dd - diag) * v)
                pre = LinearOperator((nd * n_c,) * 2, dtype=np.float64,
                                     matvec=lambda v, dd=dd: v / np.where(dd > 0, dd, 1.0))
                count = [0]

                def cb(_x, count=count):
                    count[0] += 1
                try:
                    step, _ = cg(op, -grad, rtol=cg_tolerance, maxiter=int(cg_iterations), M=pre, callback=cb)
                except TypeError:  # scipy < 1.12 calls it tol
                    step, _ = cg(op, -grad, tol=cg_tolerance, maxiter=int(cg_iterations), M=pre, callback=cb)
                cg_its.append(count[0])
                new = coeffs + np.moveaxis(step.reshape((nd,) + mshape), 0, -1)
                u2, q2, mw2, inside2 = evaluate(new)
                e2, r2, w2, sw2, gain2 = energy(new, mw2, inside2, weights_robust)
                if e2 < e and np.all(np.isfinite(step)):
                    accepted = True
                    break
                lam *= 10.0
            its += 1
            if not accepted:
                break
            lam = max(lam / 10.0, 1e-6)
            moved = float(np.abs(u2 - u).max())
            gain_e = (e - e2) / max(e, 1e-30)
            coeffs, u, q, mw, inside = new, u2, q2, mw2, inside2
            e, r, w, sw, gain = e2, r2, w2, sw2, gain2
            progress((li + (it + 1) / n_it) / len(sched),
                     f"bspline: level {li + 1}/{len(sched)}, iteration {it + 1}, "
                     f"energy {e:.5g}")
            last = li == len(sched) - 1
            if moved < tolerance or gain_e < (energy_tolerance if last else coarse_energy_tolerance):
                break
        rms = float(np.sqrt((w * r * r).sum() / sw))
        info["levels"].append(int(f))
        info["iterations"].append(its)
        info["cg"].append(cg_its)
        info["grid_shapes"].append([int(m) - 3 for m in mshape])
    full = [np.arange(n, dtype=float) for n in fixed.shape]
    fb = [sparse.csr_matrix(basis(full[a], prev_h[a], coeffs.shape[a])) for a in range(nd)]
    field = np.stack([_tensor(coeffs[..., d], fb) for d in range(nd)], axis=-1)
    info["rms"] = rms
    info["seconds"] = time.perf_counter() - t_start
    return field, info

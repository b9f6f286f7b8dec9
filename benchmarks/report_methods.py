"""The methods compared in the report: napari-registration's own (through the public
``register`` / ``register_stack``) and the peers, each called as its documentation
shows.

A method is a :class:`Method` with

* ``applies(case)``: whether it can attempt the case (its transform family, 2D/3D);
* ``run(case)``: the timed part; inputs as numpy arrays, output whatever the library
  returns, *including the warped moving image*, since every user needs it;
* ``mapper(case, raw)``: untimed; returns ``f(fixed_world_points) -> moving_world_points``
  (napari axis order) from what ``run`` returned, so TRE is computed the same way for
  everyone: ``|f(p) - truth.apply_inverse(p)|`` in moving world units.

For the ITK-based peers the mapping is read from the peer's own resampling machinery,
never from a re-derived matrix convention: elastix's deformation field (transformix)
and, for ANTs, images holding each voxel's own world coordinate warped with the
forward transforms (linear interpolation reproduces a linear function exactly).
"""

from __future__ import annotations

import importlib.util

import numpy as np

LINEAR = ("translation", "rigid", "similarity", "affine")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _sample(field_, points, spacing):
    """Linear interpolation of a (*grid, D) array at world points (zero origin)."""
    from scipy import ndimage

    idx = (np.asarray(points, float) / np.asarray(spacing, float)).T
    return np.stack([ndimage.map_coordinates(field_[..., k], idx, order=1, mode="nearest")
                     for k in range(field_.shape[-1])], axis=1)


class Method:
    name = "?"
    family = "peer"          # "ours" | "peer"
    package = ""             # what must be installed
    settings = ""            # one line: how it is called

    def available(self) -> bool:
        return True

    def applies(self, case) -> bool:
        raise NotImplementedError

    def setup(self) -> None:
        """Import the library (untimed: import cost is paid once per session)."""

    def run(self, case):
        raise NotImplementedError

    def mapper(self, case, raw):
        raise NotImplementedError

    def details(self, raw) -> dict:
        """A few diagnostics worth keeping in the raw results (small, JSON-safe)."""
        return {}


# ------------------------------------------------------------------------------- ours
class Ours(Method):
    family = "ours"
    package = "napari-registration"

    def __init__(self, method: str, **options):
        self.method = method
        self.options = options  # a documented option a user picks in the dock (e.g. ORB)
        extra = "".join(f", {k}={v!r}" for k, v in options.items())
        self.name = f"ours: {method}" + (f" ({', '.join(map(str, options.values()))})"
                                         if options else "")
        self.settings = (f"register(method={method!r}, transform=<case>{extra}, score=False) "
                         f"(stacks: register_stack(reference='first', ...{extra}, score=False)), "
                         "defaults otherwise")

    def _info(self):
        from napari_registration import method_info

        return method_info(self.method)

    def transform_for(self, case) -> str | None:
        info = self._info()
        want = "bspline" if case.model == "deformable" else case.model
        if want not in info["transforms"]:
            return None
        if info["ndims"] is not None and case.ndim not in info["ndims"]:
            return None
        return want

    def applies(self, case) -> bool:
        if case.is_stack and self.method == "auto":
            return False
        if self.method == "fourier" and case.model != "translation" and case.ndim != 2:
            return False  # documented: log-polar rotation/scale is 2D only
        return self.transform_for(case) is not None

    def setup(self):
        import napari_registration  # noqa: F401

    def run(self, case):
        from napari_registration import register, register_stack

        tf = self.transform_for(case)
        if case.is_stack:
            return register_stack(case.frames, reference="first", method=self.method,
                                  transform=tf, spacing=case.spacing, score=False, **self.options)
        return register(case.fixed, case.moving, method=self.method, transform=tf,
                        fixed_spacing=case.spacing, moving_spacing=case.spacing, score=False,
                        **self.options)

    def mapper(self, case, raw):
        if case.is_stack:
            return [t.apply_inverse for t in raw.transforms]
        return raw.transform.apply_inverse

    def details(self, raw) -> dict:
        info = getattr(raw, "info", None)
        if not isinstance(info, dict):
            return {}
        out = {"backend_seconds": info.get("backend_seconds")}
        deform = info.get("deformable")
        if isinstance(deform, dict):
            out["deformable_iterations"] = deform.get("iterations")
            out["deformable_seconds"] = deform.get("seconds")
            out["deformable_engine"] = deform.get("engine") or "ITK's LBFGSB"
        chosen = info.get("chosen")
        if isinstance(chosen, dict):
            out["chosen"] = f"{chosen.get('method')} {chosen.get('model')} on {chosen.get('on')}"
        stages = info.get("stages")
        if isinstance(stages, list):
            out["stages"] = [f"{st.get('method')}/{st.get('model')} on {st.get('on')}"
                             + (f": {str(st['error'])[:120]}" if st.get("error") else "")
                             for st in stages if isinstance(st, dict)]
            out["stage_errors"] = sum(bool(st.get("error")) for st in stages if isinstance(st, dict))
        return out


# ------------------------------------------------------------------------- scikit-image
class PhaseCorrelation(Method):
    name = "skimage phase_cross_correlation"
    package = "scikit-image"
    settings = "phase_cross_correlation(fixed, moving, upsample_factor=100) + ndimage.shift"

    def applies(self, case):
        return case.model == "translation"

    def setup(self):
        from skimage.registration import phase_cross_correlation  # noqa: F401

    def _one(self, fixed, moving):
        from scipy import ndimage
        from skimage.registration import phase_cross_correlation

        shift = phase_cross_correlation(fixed, moving, upsample_factor=100)[0]
        return shift, ndimage.shift(moving, shift, order=1)

    def run(self, case):
        if case.is_stack:
            return [self._one(case.frames[0], f) for f in case.frames]
        return self._one(case.fixed, case.moving)

    def mapper(self, case, raw):
        # the shift registers moving onto fixed: fixed point p is moving point p - shift
        sp = np.asarray(case.spacing, float)
        if case.is_stack:
            return [(lambda p, s=s: np.asarray(p) - s * sp) for s, _ in raw]
        shift = raw[0]
        return lambda p: np.asarray(p) - shift * sp


# ------------------------------------------------------------------------------ OpenCV
class OpenCVSift(Method):
    name = "OpenCV SIFT + RANSAC"
    package = "opencv-python-headless"
    settings = ("SIFT_create(), BFMatcher knnMatch k=2, Lowe ratio 0.75; estimateAffinePartial2D "
                "(translation/rigid/similarity), estimateAffine2D (affine), findHomography "
                "RANSAC 5.0 (homography); warpPerspective")

    def _detector(self):
        import cv2

        return cv2.SIFT_create(), cv2.NORM_L2

    def available(self):
        return installed("cv2")

    def applies(self, case):
        return case.ndim == 2 and not case.is_stack and case.model in LINEAR + ("homography",)

    def setup(self):
        import cv2  # noqa: F401

    def run(self, case):
        import cv2

        f8 = np.clip(case.fixed * 255, 0, 255).astype(np.uint8)
        m8 = np.clip(case.moving * 255, 0, 255).astype(np.uint8)
        detector, norm = self._detector()
        kf, df = detector.detectAndCompute(f8, None)
        km, dm = detector.detectAndCompute(m8, None)
        if df is None or dm is None or len(kf) < 4 or len(km) < 4:
            raise RuntimeError("too few keypoints")
        matches = cv2.BFMatcher(norm).knnMatch(dm, df, k=2)
        good = [m for m, n in (p for p in matches if len(p) == 2) if m.distance < 0.75 * n.distance]
        if len(good) < 4:
            raise RuntimeError(f"only {len(good)} matches pass the ratio test")
        src = np.float32([km[m.queryIdx].pt for m in good]).reshape(-1, 1, 2)
        dst = np.float32([kf[m.trainIdx].pt for m in good]).reshape(-1, 1, 2)
        if case.model == "homography":
            h, _ = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
        elif case.model == "affine":
            a, _ = cv2.estimateAffine2D(src, dst)
            h = None if a is None else np.vstack([a, [0, 0, 1]])
        else:
            a, _ = cv2.estimateAffinePartial2D(src, dst)
            h = None if a is None else np.vstack([a, [0, 0, 1]])
        if h is None:
            raise RuntimeError("no model found")
        warped = cv2.warpPerspective(case.moving, h, case.fixed.shape[::-1])
        return h, warped

    def mapper(self, case, raw):
        hinv = np.linalg.inv(raw[0])   # (x, y): fixed -> moving

        def f(p):
            p = np.asarray(p, float)
            xy1 = np.c_[p[:, 1], p[:, 0], np.ones(len(p))] @ hinv.T
            xy = xy1[:, :2] / xy1[:, 2:]
            return xy[:, ::-1]
        return f


class OpenCVOrb(OpenCVSift):
    name = "OpenCV ORB + RANSAC"
    settings = ("ORB_create(nfeatures=5000), BFMatcher(NORM_HAMMING) knnMatch k=2, ratio 0.75; "
                "then as SIFT")

    def _detector(self):
        import cv2

        return cv2.ORB_create(nfeatures=5000), cv2.NORM_HAMMING


# --------------------------------------------------------------------------- SimpleITK
class SimpleITKDirect(Method):
    name = "SimpleITK (notebook settings)"
    package = "SimpleITK"
    settings = ("ImageRegistrationMethod: Mattes MI 50 bins, random sampling (1 % in 3D as in "
                "the notebooks, 10 % in 2D where 1 % of a 4x-shrunk image is ~160 samples), linear "
                "interpolation, regular-step GD (lr 1, min step 1e-4, 200 it), scales from "
                "physical shift, pyramid 4/2/1 + smoothing 2/1/0, geometry-centred "
                "initializer; B-spline: 8-node mesh, LBFGSB; Resample for the warped image")

    def available(self):
        return installed("SimpleITK")

    def applies(self, case):
        return not case.is_stack and case.model in LINEAR + ("deformable",)

    def setup(self):
        import SimpleITK  # noqa: F401

    def run(self, case):
        import SimpleITK as sitk

        from napari_registration.core.itk import to_sitk_image

        fixed = to_sitk_image(case.fixed.astype(np.float32), case.spacing)
        moving = to_sitk_image(case.moving.astype(np.float32), case.spacing)
        d = case.ndim
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.1 if d == 2 else 0.01)
        reg.SetInterpolator(sitk.sitkLinear)
        if case.model == "deformable":
            init = sitk.BSplineTransformInitializer(fixed, [8] * d)
            reg.SetInitialTransform(init, inPlace=True)
            reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=100,
                                     maximumNumberOfCorrections=5,
                                     maximumNumberOfFunctionEvaluations=1000,
                                     costFunctionConvergenceFactor=1e7)
        else:
            kinds = {
                "translation": lambda: sitk.TranslationTransform(d),
                "rigid": lambda: sitk.Euler2DTransform() if d == 2 else sitk.Euler3DTransform(),
                "similarity": lambda: (sitk.Similarity2DTransform() if d == 2
                                       else sitk.Similarity3DTransform()),
                "affine": lambda: sitk.AffineTransform(d),
            }
            base = kinds[case.model]()
            if case.model != "translation":
                base = sitk.CenteredTransformInitializer(
                    fixed, moving, base, sitk.CenteredTransformInitializerFilter.GEOMETRY)
            reg.SetInitialTransform(base, inPlace=False)
            reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                         numberOfIterations=200)
            reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        tx = reg.Execute(fixed, moving)
        warped = sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0)
        return tx, sitk.GetArrayFromImage(warped)

    def mapper(self, case, raw):
        tx = raw[0]

        def f(p):
            # ITK physical (x, y, z) = napari world reversed; the transform maps fixed -> moving
            return np.array([tx.TransformPoint(tuple(float(v) for v in q[::-1]))[::-1]
                             for q in np.asarray(p, float)])
        return f


# ------------------------------------------------------------------------- itk-elastix
class Elastix(Method):
    name = "itk-elastix (default maps)"
    package = "itk-elastix"
    settings = ("elastix_registration_method with GetDefaultParameterMap('translation' | 'rigid' | "
                "'affine'); similarity = the rigid map with Transform SimilarityTransform; "
                "deformable = 'affine' then 'bspline'")

    def available(self):
        from importlib.metadata import PackageNotFoundError, version

        try:
            version("itk-elastix")
        except PackageNotFoundError:
            return False
        return installed("itk")

    def applies(self, case):
        return not case.is_stack and case.model in LINEAR + ("deformable",)

    def setup(self):
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018 - itk loads lazily; pay the import here

    def _image(self, array, spacing):
        import itk

        img = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
        img.SetSpacing([float(s) for s in spacing[::-1]])
        return img

    def run(self, case):
        import itk

        fixed = self._image(case.fixed, case.spacing)
        moving = self._image(case.moving, case.spacing)
        po = itk.ParameterObject.New()
        if case.model == "deformable":
            po.AddParameterMap(po.GetDefaultParameterMap("affine"))
            po.AddParameterMap(po.GetDefaultParameterMap("bspline"))
        elif case.model == "similarity":
            pm = po.GetDefaultParameterMap("rigid")
            pm["Transform"] = ["SimilarityTransform"]
            po.AddParameterMap(pm)
        else:
            po.AddParameterMap(po.GetDefaultParameterMap(case.model))
        warped, params = itk.elastix_registration_method(fixed, moving, parameter_object=po,
                                                         log_to_console=False)
        return params, np.asarray(warped), moving

    def mapper(self, case, raw):
        import itk

        import os
        import tempfile

        params, _, moving = raw
        # transformix writes deformationField.nii into the working directory: keep it out
        # of the repository
        here = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                field_img = itk.transformix_deformation_field(moving, params)
            finally:
                os.chdir(here)
        field_ = np.asarray(field_img, dtype=np.float64)[..., ::-1]   # (x,y,z) -> napari
        return lambda p: np.asarray(p, float) + _sample(field_, p, case.spacing)


# ------------------------------------------------------------------------------ ANTsPy
class Ants(Method):
    name = "ANTsPy"
    package = "antspyx"
    settings = ("ants.registration(type_of_transform='Translation' | 'Rigid' | 'Similarity' | "
                "'Affine' | 'SyN'), defaults otherwise")
    _TYPES = {"translation": "Translation", "rigid": "Rigid", "similarity": "Similarity",
              "affine": "Affine", "deformable": "SyN"}

    def available(self):
        return installed("ants")

    def applies(self, case):
        return not case.is_stack and case.model in self._TYPES

    def setup(self):
        import ants  # noqa: F401

    def run(self, case):
        import ants

        # ANTsPy keeps numpy's axis order; spacing per array axis
        fixed = ants.from_numpy(case.fixed.astype(np.float32), spacing=tuple(map(float, case.spacing)))
        moving = ants.from_numpy(case.moving.astype(np.float32), spacing=tuple(map(float, case.spacing)))
        out = ants.registration(fixed, moving, type_of_transform=self._TYPES[case.model])
        return out, fixed, moving

    def mapper(self, case, raw):
        import ants

        out, fixed, moving = raw
        sp = np.asarray(case.spacing, float)
        grids = np.indices(case.moving.shape, dtype=np.float32)
        cols = []
        for k in range(case.ndim):
            coord = ants.from_numpy((grids[k] * sp[k]).astype(np.float32), spacing=tuple(map(float, sp)))
            cols.append(ants.apply_transforms(fixed, coord, out["fwdtransforms"],
                                              interpolator="linear").numpy())
        field_ = np.stack(cols, axis=-1).astype(np.float64)   # moving world coordinate per fixed voxel
        return lambda p: _sample(field_, p, case.spacing)


# --------------------------------------------------------------------------- pystackreg
class PyStackReg(Method):
    name = "pystackreg"
    package = "pystackreg"
    settings = ("StackReg(TRANSLATION | RIGID_BODY | SCALED_ROTATION | AFFINE): register(fixed, "
                "moving) then transform (pairs); register_stack(reference='first') then "
                "transform_stack (stacks)")

    def available(self):
        return installed("pystackreg")

    def applies(self, case):
        # pairs too (TurboReg registers two images): the most precise 2D linear peer
        return case.ndim == 2 and case.model in LINEAR

    def setup(self):
        import pystackreg  # noqa: F401

    def run(self, case):
        from pystackreg import StackReg

        kind = {"translation": StackReg.TRANSLATION, "rigid": StackReg.RIGID_BODY,
                "similarity": StackReg.SCALED_ROTATION, "affine": StackReg.AFFINE}[case.model]
        sr = StackReg(kind)
        if not case.is_stack:
            tmat = sr.register(case.fixed, case.moving)
            return [tmat], sr.transform(case.moving, tmat)
        tmats = sr.register_stack(case.frames, reference="first")
        warped = sr.transform_stack(case.frames)
        return tmats, warped

    def mapper(self, case, raw):
        # tmats follow skimage.transform.warp: output (reference) (x, y) -> input (frame) (x, y)
        if not case.is_stack:
            return self._mappers(raw)[0]
        return self._mappers(raw)

    @staticmethod
    def _mappers(raw):
        out = []
        for t in raw[0]:
            def f(p, t=t):
                p = np.asarray(p, float)
                xy1 = np.c_[p[:, 1], p[:, 0], np.ones(len(p))] @ np.asarray(t).T
                return (xy1[:, :2] / xy1[:, 2:])[:, ::-1]
            out.append(f)
        return out


def all_methods() -> list[Method]:
    from napari_registration import available_methods

    ours = [Ours(m) for m in available_methods() if m != "landmarks"]
    if "features" in available_methods():  # the fast keypoint choice, against OpenCV's ORB
        ours.append(Ours("features", detector="orb"))
    peers = [PhaseCorrelation(), OpenCVSift(), OpenCVOrb(), SimpleITKDirect(), Elastix(), Ants(),
             PyStackReg()]
    return ours + peers

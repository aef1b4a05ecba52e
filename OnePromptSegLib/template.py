"""Template mode across patients: one annotated patient (the template) seeds the segmentation of another (target).

    reg = register_template(template, template_mask, target)            # SimpleITK: affine on a pyramid
    prior = warp_mask(template_mask, template, target, reg)               # the template's labels on the target grid
    prior = refine_slicewise(prior, template, target, reg)                # short stacks: each slice refined in 2D
    sess = PropagationSession(model); sess.set_volume(target.array, "k", target.spacing)
    anchors = seed_from_prior(sess, prior)                                # its most trustworthy slices, anchored
    for r in sess.propagate(): ...                                        # the engine refines slice by slice

Why registration: the One-Prompt model alone, matching a template slice against every target slice, scored Dice 0.28
across patients (docs/BENCHMARKS.md): it must find *where* the structure is in an unseen image from one 2D slice.
A 3D registration of the whole template volume finds where and roughly what shape; the engine then does what it
does well, following the target's own boundaries from slices it is given.

The registration is SimpleITK's framework (``ImageRegistrationMethod``): Mattes mutual information (the two patients'
intensities differ, even between MRIs of one protocol), the two fields of view centred on each other, then an affine
stage on a three-level pyramid.  It samples only a box around the template's structure (the moving-image mask,
grown by ``roi_margin_mm``), so the structure and its surroundings are what gets aligned, not the whole field of view.
On a short stack (at most ``slicewise_max_slices`` slices, e.g. a cine MRI of 6-17 thick slices) each slice of
the warped labels is then refined by a 2D registration of its own (:func:`refine_slicewise`).
Images may differ in size, spacing, orientation and origin: everything is in physical (LPS) space.  A B-spline stage
after the affine one and an exhaustive search of shifts before it were measured and dropped (docs/BENCHMARKS.md).

``progress`` callbacks receive (stage, step) and return False to cancel: the registration stops and
:class:`Cancelled` is raised (the Slicer module's cancel button).  Stages 0-2 are the affine's pyramid levels (step:
the optimiser's iteration), stage 3 the refinement slice by slice (step: slices done).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoints import LoadedModel
from .io import Volume, _sitk
from .prompts import AxisLike, PromptError
from .session import PropagationSession
from .settings import EngineSettings

if TYPE_CHECKING:
    import SimpleITK as sitk

#: called as progress(stage, step): stages 0-2 the affine's pyramid levels at each optimiser iteration, stage
#: ``SLICEWISE`` each slice of ``refine_slicewise``; returning False cancels
ProgressCallback = Callable[[int, int], bool]
SLICEWISE = 3


class Cancelled(Exception):
    """The caller's progress callback asked to stop."""


@dataclass
class RegistrationSettings:
    """How the template is registered to the target (defaults measured on eval's cross-patient pairs)."""

    iterations: int = 200  #: per pyramid level
    samples: int = 40000  #: voxels sampled by the metric at full resolution (random, seeded: reproducible)
    roi_margin_mm: float = 60.0  #: the metric samples the template structure's bounding box grown by this
    #: refine each slice of the warped labels in 2D after the 3D affine (:func:`refine_slicewise`) when the target
    #: has at most this many slices along the slice axis (a short stack such as a cine MRI); 0 = never
    slicewise_max_slices: int = 20
    slice_margin_mm: float = 20.0  #: each slice's 2D metric samples the warped structure's box grown by this
    slice_iterations: int = 100  #: per pyramid level, each slice
    #: a slice whose 2D shift strays further than this from the slices' median shift takes the median transform
    slice_stray_mm: float = 5.0


def _float_image(volume: Volume):
    sitk = _sitk()
    return sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)


def _roi_mask(volume: Volume, mask: np.ndarray, margin_mm: float):
    """A box around ``mask`` grown by ``margin_mm`` on each side, as a SimpleITK mask on ``volume``'s grid."""
    roi = np.zeros(mask.shape, np.uint8)
    grow = [int(np.ceil(margin_mm / s)) for s in volume.spacing_kji]
    box = []
    for d in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(o for o in range(3) if o != d)))
        box.append(slice(max(0, idx[0] - grow[d]), idx[-1] + grow[d] + 1))
    roi[tuple(box)] = 1
    return volume.to_sitk(roi)


def _levels(fixed, factors: Sequence[int]) -> List[int]:
    """Shrink factors that never reduce the image's thinnest side below 4 voxels (a 6-slice cine MRI)."""
    thin = min(fixed.GetSize())
    return [max(1, min(f, thin // 4)) for f in factors]


def register_template(template: Volume, template_mask: np.ndarray, target: Volume,
                      settings: Optional[RegistrationSettings] = None,
                      progress: Optional[ProgressCallback] = None) -> "sitk.Transform":
    """The affine transform (target physical point -> template physical point) that carries ``template``'s structure
    (``template_mask``, non-zero voxels on the template's grid) onto ``target``.

    Raises PromptError for an empty mask or a mask off the template's grid and when the registration itself fails
    (a blank image, images that never overlap), :class:`Cancelled` when ``progress`` returns False.
    """
    sitk = _sitk()
    settings = settings or RegistrationSettings()
    mask = np.asarray(template_mask) != 0
    if mask.shape != template.array.shape:
        raise PromptError(f"the template mask's shape {mask.shape} differs from the template image's "
                          f"{template.array.shape}: give the mask on the template image's grid")
    if not mask.any():
        raise PromptError("the template mask is empty: nothing to carry to the target")
    fixed, moving = _float_image(target), _float_image(template)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(min(1.0, settings.samples / float(np.prod(fixed.GetSize()))), seed=1)
    reg.SetMetricMovingMask(_roi_mask(template, mask, settings.roi_margin_mm))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                 numberOfIterations=settings.iterations,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(_levels(fixed, [4, 2, 1]))
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                              sitk.CenteredTransformInitializerFilter.GEOMETRY),
                            inPlace=False)
    cancelled: List[bool] = []
    if progress is not None:
        def step() -> None:
            if progress(reg.GetCurrentLevel(), reg.GetOptimizerIteration()) is False:
                cancelled.append(True)
                reg.StopRegistration()
        reg.AddCommand(sitk.sitkIterationEvent, step)
    try:
        transform = reg.Execute(fixed, moving)
    except RuntimeError as e:  # e.g. a blank image, or images that never overlap: ITK's own words, in short
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or ["no detail"]
        detail = next((line.split("): ", 1)[-1] for line in lines if "ITK ERROR" in line), lines[-1])
        raise PromptError(f"the template could not be registered to the target ({detail}): check that both "
                          "images show the same anatomy, that neither is blank, and that their orientations are "
                          "set") from e
    if cancelled:
        raise Cancelled("registration cancelled")
    return transform


def warp_mask(template_mask: np.ndarray, template: Volume, target: Volume, transform: "sitk.Transform") -> np.ndarray:
    """``template_mask`` (non-zero = inside, template grid) carried onto ``target``'s grid: (k, j, i) probabilities
    in [0, 1] (linear interpolation of the binary mask, so its 0.5 level is a smooth outline, not voxel steps)."""
    sitk = _sitk()
    moving = template.to_sitk((np.asarray(template_mask) != 0).astype(np.float32))
    ref = target.to_sitk(np.zeros(target.array.shape, np.uint8))
    warped = sitk.Resample(moving, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(warped)


def _similarity2d(centre: Sequence[float], parameters: Optional[Sequence[float]] = None):
    sitk = _sitk()
    t = sitk.Similarity2DTransform()
    t.SetCenter([float(c) for c in centre])
    if parameters is not None:
        t.SetParameters([float(p) for p in parameters])
    return t


def refine_slicewise(prior: np.ndarray, template: Volume, target: Volume, transform: "sitk.Transform",
                     settings: Optional[RegistrationSettings] = None, axis: int = 0,
                     progress: Optional[ProgressCallback] = None) -> np.ndarray:
    """``prior`` (the warped labels on ``target``'s grid, from :func:`warp_mask`) refined slice by slice along the
    numpy axis ``axis``: on each slice the warped labels reach, the template (resampled onto the target's grid by
    the 3D ``transform``) is registered to the target slice in 2D (similarity: shift, rotation, scale; normalised
    correlation, which beat Mattes MI per slice on ACDC; a three-level pyramid; the metric masked to the warped
    structure's box on that slice grown by ``slice_margin_mm``) and that slice's labels follow the 2D transform.

    Why: a 3D affine over a stack of a few thick slices (a cine MRI) is poorly held along the slice axis, and the
    structure's place and outline drift from slice to slice; each slice's own fit follows them.  On volumes of
    many thin slices (left atrium MRI, 60-90 slices) the 3D affine is already the better fit and the per-slice
    one only adds noise, so :func:`template_session` applies this to short stacks only
    (``slicewise_max_slices``).  A slice whose fit strays (its shift more than ``slice_stray_mm`` from the
    slices' median: a slice with little structure, a fit that latched onto a neighbour organ) takes the median
    transform instead.  The input ``prior`` is left as it was.
    """
    sitk = _sitk()
    settings = settings or RegistrationSettings()
    prior = np.asarray(prior, np.float32)
    ref = target.to_sitk(np.zeros(target.array.shape, np.uint8))
    resampled = sitk.GetArrayFromImage(sitk.Resample(_float_image(template), ref, transform, sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat32))
    fixed_all = np.moveaxis(np.asarray(target.array, np.float32), axis, 0)
    moving_all, prior_k = np.moveaxis(resampled, axis, 0), np.moveaxis(prior, axis, 0)
    rows, cols = [d for d in range(3) if d != axis]
    spacing = (target.spacing_kji[cols], target.spacing_kji[rows])  # SimpleITK's (x, y) = numpy's (col, row)
    inside = prior_k > 0.5
    slices = [k for k in range(inside.shape[0]) if inside[k].any()]
    if not slices:
        return prior
    centroid = np.argwhere(inside).mean(axis=0)
    centre = (float(centroid[2] * spacing[0]), float(centroid[1] * spacing[1]))

    def image(a: np.ndarray):
        im = sitk.GetImageFromArray(np.ascontiguousarray(a, np.float32))
        im.SetSpacing(spacing)
        return im

    grow = [int(np.ceil(settings.slice_margin_mm / s)) for s in (spacing[1], spacing[0])]  # rows, cols
    fits = {}
    for n, k in enumerate(slices):
        if progress is not None and progress(SLICEWISE, n) is False:
            raise Cancelled("registration cancelled")
        if moving_all[k].std() == 0 or fixed_all[k].std() == 0:
            continue
        box = np.zeros(inside[k].shape, np.uint8)
        r, c = np.flatnonzero(inside[k].any(axis=1)), np.flatnonzero(inside[k].any(axis=0))
        box[max(0, r[0] - grow[0]):r[-1] + grow[0] + 1, max(0, c[0] - grow[1]):c[-1] + grow[1] + 1] = 1
        mask = sitk.GetImageFromArray(box)
        mask.SetSpacing(spacing)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsCorrelation()
        reg.SetMetricSamplingStrategy(reg.NONE)
        reg.SetMetricMovingMask(mask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3,
                                                     numberOfIterations=settings.slice_iterations,
                                                     gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(_similarity2d(centre), inPlace=False)
        try:
            fit = reg.Execute(image(fixed_all[k]), image(moving_all[k]))
        except RuntimeError:  # a slice with too little overlap: it takes the median below
            continue
        if hasattr(fit, "GetNthTransform"):  # a composite wrapping the similarity
            fit = fit.GetNthTransform(0)
        fits[k] = np.asarray(fit.GetParameters(), float)
    if not fits:
        return prior
    median = np.median(np.stack(list(fits.values())), axis=0)
    out = prior_k.copy()
    for k in slices:
        p = fits.get(k)
        if p is None or np.linalg.norm(p[-2:] - median[-2:]) > settings.slice_stray_mm:
            p = median
        out[k] = sitk.GetArrayFromImage(sitk.Resample(image(prior_k[k]), image(fixed_all[k]), _similarity2d(centre, p),
                                                      sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    return np.moveaxis(out, 0, axis)


def seed_from_prior(session: PropagationSession, prior: np.ndarray, anchors: int = 1) -> List[int]:
    """Anchor ``session`` (over the target volume) on the warped template's most trustworthy slices; returns them.

    Trustworthy = near the middle of the structure's extent along the slice axis, where the registration has most
    of the structure around it to align; the ends (where a structure appears or vanishes between two patients at
    different slices) are left to the engine's stop rule.  ``anchors`` slices are taken at evenly spaced quantiles of
    the extent, weighted by area.
    """
    a = session.naxis
    other = tuple(d for d in range(3) if d != a)
    inside = np.asarray(prior) > 0.5
    area = inside.sum(axis=other).astype(float)
    if not area.any():
        raise PromptError("the registered template does not reach the target volume: check that the template and "
                          "the target show the same anatomy")
    cum = np.cumsum(area) / area.sum()
    picks = sorted({int(np.searchsorted(cum, q)) for q in (np.arange(anchors) + 0.5) / anchors})
    for s in picks:
        session.add_seed(s, np.take(inside, s, axis=a), 1.0)
    return picks


def template_session(model: LoadedModel, target: Volume, template: Volume, template_mask: np.ndarray,
                     axis: AxisLike = "k", settings: Optional[EngineSettings] = None,
                     registration: Optional[RegistrationSettings] = None, anchors: int = 1,
                     progress: Optional[ProgressCallback] = None) -> Tuple[PropagationSession, np.ndarray]:
    """A :class:`PropagationSession` over ``target`` seeded from ``template`` and its structure ``template_mask``
    (non-zero voxels on the template's grid, the whole structure or only some drawn slices of it): registered,
    warped, and anchored on the warped labels' ``anchors`` most trustworthy slices.  Iterate its ``propagate()``
    for the result (per-slice progress; stop iterating to cancel).  ``progress`` sees the registration's iterations
    and cancels it by returning False (:class:`Cancelled`).  Returns the session and the warped template labels
    ((k, j, i) probabilities on the target's grid: registration alone, to show or compare).
    """
    registration = registration or RegistrationSettings()
    transform = register_template(template, template_mask, target, registration, progress)
    prior = warp_mask(template_mask, template, target, transform)
    session = PropagationSession(model, settings)
    session.set_volume(target.array, axis, target.spacing)
    if target.array.shape[session.naxis] <= registration.slicewise_max_slices:
        prior = refine_slicewise(prior, template, target, transform, registration, session.naxis, progress)
    seed_from_prior(session, prior, anchors)
    return session, prior

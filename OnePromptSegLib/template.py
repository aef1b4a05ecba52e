"""Template mode across patients: one annotated patient (the template) seeds the segmentation of another (target).

    reg = register_template(template, template_mask, target)            # SimpleITK: affine on a pyramid
    prior = warp_mask(template_mask, template, target, reg)               # the template's labels on the target grid
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
Images may differ in size, spacing, orientation and origin: everything is in physical (LPS) space.  A B-spline stage
after the affine one and an exhaustive search of shifts before it were measured and dropped (docs/BENCHMARKS.md).

``progress`` callbacks receive (pyramid level, iteration) and return False to cancel: the registration stops and
:class:`Cancelled` is raised (the Slicer module's cancel button).
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

#: called as progress(pyramid level 0..2, iteration) at each optimiser iteration; returning False cancels
ProgressCallback = Callable[[str, int], bool]


class Cancelled(Exception):
    """The caller's progress callback asked to stop."""


@dataclass
class RegistrationSettings:
    """How the template is registered to the target (defaults measured on eval's cross-patient pairs)."""

    iterations: int = 200  #: per pyramid level
    samples: int = 40000  #: voxels sampled by the metric at full resolution (random, seeded: reproducible)
    roi_margin_mm: float = 60.0  #: the metric samples the template structure's bounding box grown by this


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
    transform = register_template(template, template_mask, target, registration, progress)
    prior = warp_mask(template_mask, template, target, transform)
    session = PropagationSession(model, settings)
    session.set_volume(target.array, axis, target.spacing)
    seed_from_prior(session, prior, anchors)
    return session, prior

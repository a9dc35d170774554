"""MRI bias-field correction: SimpleITK N4 at reduced resolution, evaluated back at full resolution.

Receive coils leave a smooth multiplicative shading across an MRI (often +-20 % across the brain). Left in, the
percentile normalisation maps the same tissue to different values in different places and the model learns, or
flags, the shading. N4 (Tustison et al. 2010) fits the log bias as a B-spline inside the brain mask. The field is
smooth, so it is fitted on the image averaged to about ``N4_MM`` (about 2 s of CPU instead of minutes) and then
evaluated on the full grid; it is applied to the model-grid image by division, so no extra interpolation touches the
intensities. One ITK thread: the same field on every run and machine.
"""

from __future__ import annotations

import numpy as np

from brainfm.data.registration import itk_threads, sitk_image

N4_MM = 6.0
# Two fitting levels (the B-spline control grid doubles per level). Measured on ICBM152 with a +-30 % field: white-
# matter CV 0.079 -> 0.028 (0.025 unbiased) in ~2 s of CPU. A third level fits anatomy as "bias" (a 13-20 % log
# range on a bias-free template, and a different one for the same head tilted); two levels: 4-7 %.
N4_ITERATIONS = (50, 50)


def n4_log_bias(image: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Log of the N4 bias field of ``image`` (fitted inside ``mask``) on the image's own grid; divide the image by
    ``exp`` of it to correct."""
    import SimpleITK as sitk

    values = np.asarray(image, dtype=np.float32)
    floor = float(values[mask > 0].max()) * 1e-3
    positive = np.maximum(values, floor)  # N4 works on log intensities: keep every voxel above 0
    with itk_threads(1):
        full = sitk_image(positive, affine)
        shrink = [max(1, round(N4_MM / s)) for s in full.GetSpacing()]
        small = sitk.BinShrink(full, shrink)
        small_mask = sitk.Cast(sitk.BinShrink(sitk_image(mask.astype(np.float32), affine), shrink) > 0.5,
                               sitk.sitkUInt8)
        corrector = sitk.N4BiasFieldCorrectionImageFilter()
        corrector.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
        corrector.Execute(small, small_mask)
        log_bias = corrector.GetLogBiasFieldAsImage(full)
    return np.transpose(sitk.GetArrayFromImage(log_bias), (2, 1, 0)).astype(np.float32)

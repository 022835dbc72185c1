"""Volumes in and labelmaps out, with exact geometry (LPS, arrays in k, j, i order)."""

from meddl.io.dicom import list_series
from meddl.io.image import GEOMETRY_TOLERANCE, Image
from meddl.io.readers import image_from_sitk, image_to_sitk, read_image, write_image
from meddl.io.safety import validate_for_inference

__all__ = [
    "Image",
    "GEOMETRY_TOLERANCE",
    "read_image",
    "write_image",
    "image_from_sitk",
    "image_to_sitk",
    "list_series",
    "validate_for_inference",
]

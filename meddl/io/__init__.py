"""Volumes in and labelmaps out, with exact geometry (LPS, arrays in k, j, i order)."""

from meddl.io.image import GEOMETRY_TOLERANCE, Image
from meddl.io.readers import image_from_sitk, image_to_sitk, read_image, write_image

__all__ = ["Image", "GEOMETRY_TOLERANCE", "read_image", "write_image", "image_from_sitk", "image_to_sitk"]

"""Reading volumes (NRRD, NIfTI, MetaImage, DICOM series) into :class:`Image`, and writing them atomically.

PROVISIONAL minimal version; the IO owner hardens it (header checks before allocation, DICOM series
rules, child-process reading of untrusted files).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

from meddl.errors import InputError
from meddl.io.image import Image

__all__ = ["read_image", "write_image", "image_from_sitk", "image_to_sitk"]

PathLike = Union[str, os.PathLike]


def image_from_sitk(itk_image: sitk.Image) -> Image:
    return Image(
        array=sitk.GetArrayFromImage(itk_image),
        spacing=itk_image.GetSpacing(),
        origin=itk_image.GetOrigin(),
        direction=np.array(itk_image.GetDirection()).reshape(3, 3),
    )


def image_to_sitk(image: Image) -> sitk.Image:
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(image.array))
    itk_image.SetSpacing(image.spacing)
    itk_image.SetOrigin(image.origin)
    itk_image.SetDirection(image.direction.flatten().tolist())
    return itk_image


def read_image(path: PathLike) -> Image:
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    try:
        itk_image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"cannot read as an image ({str(error).strip().splitlines()[-1]})", path) from None
    if itk_image.GetDimension() != 3:
        raise InputError(f"expected a 3D volume, got {itk_image.GetDimension()}D", path)
    image = image_from_sitk(itk_image)
    image.metadata["source"] = str(path)
    return image


def write_image(image: Image, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image_to_sitk(image), temporary, useCompression=True)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path

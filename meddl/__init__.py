"""SlicerMedDL engine: read volumes exactly, segment and classify them with packaged MONAI models,
and learn from corrections without forgetting.

The engine imports no Slicer, Qt or CTK. Heavy dependencies (torch, MONAI) are imported by the
modules that need them, so that ``meddl.client`` stays light enough for Slicer's GUI process.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

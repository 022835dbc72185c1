"""Model packages (``model.json`` + ``weights.safetensors``): schema, loading, saving."""

from meddl.models.package import (
    ALLOWED_ARCHITECTURES,
    FIELD_TERMS,
    SCHEMA_VERSION,
    Label,
    ModelPackage,
    ModelSpec,
    build_network,
    load_model,
    load_spec,
    save_model,
    unet_segmentation_spec,
)

__all__ = [
    "ALLOWED_ARCHITECTURES",
    "FIELD_TERMS",
    "SCHEMA_VERSION",
    "Label",
    "ModelPackage",
    "ModelSpec",
    "build_network",
    "load_model",
    "load_spec",
    "save_model",
    "unet_segmentation_spec",
]

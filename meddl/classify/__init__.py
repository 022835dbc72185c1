"""Classification of volumes and 2D images: training, calibrated inference, Grad-CAM and evaluation.

Classifier packages use the same format as segmentation packages (``model.json`` + ``weights.safetensors``,
task ``classification``); see ``docs/classification.md``.
"""

from meddl.classify.evaluate import classification_metrics, evaluate_classifier
from meddl.classify.infer import ClassificationResult, classify_file, classify_image, load_classifier
from meddl.classify.preprocess import class_value, read_classification_input
from meddl.classify.train import default_classifier_spec, train_classifier

__all__ = [
    "ClassificationResult",
    "class_value",
    "classification_metrics",
    "classify_file",
    "classify_image",
    "default_classifier_spec",
    "evaluate_classifier",
    "load_classifier",
    "read_classification_input",
    "train_classifier",
]

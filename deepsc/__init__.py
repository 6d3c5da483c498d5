"""DeepSC-COVID: joint 3D lesion segmentation and explainable classification of chest CT.

Importing the package is cheap on purpose: torch, monai, mlflow, great_expectations and kfp
are imported inside the functions that use them.
"""

__version__ = "0.1.0"

CLASSES = ("covid", "cap", "normal")
"""Class order used everywhere (MODEL_FACTS: 0 = COVID-19, 1 = CAP, 2 = non-pneumonia)."""

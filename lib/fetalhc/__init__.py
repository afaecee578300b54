"""FetalHC: fetal head circumference from 2-D ultrasound (Mask R-CNN -> ellipse -> HC in mm -> GA)."""
__version__ = "0.1.0"

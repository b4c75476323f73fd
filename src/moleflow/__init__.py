"""moleflow: continual anomaly detection on industrial images with MoLE-Flow."""

__version__ = "0.1.0"

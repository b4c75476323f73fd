"""moleflow: continual anomaly detection on industrial images with MoLE-Flow.

    from moleflow import Detector
    detector = Detector.load("runs/demo/model")
    prediction = detector.predict("image.png")

The API is imported on first use, so `import moleflow` (and the command line) stays light: torch and
its thread settings are loaded only when a model is.
"""

__version__ = "0.1.0"
__all__ = ["Detector", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in ("Detector", "Prediction"):
        from moleflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'moleflow' has no attribute {name!r}")

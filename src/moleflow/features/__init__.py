"""Stage 2: the frozen backbone, its weights, and the feature cache."""

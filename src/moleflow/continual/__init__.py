"""Stage 8: scenarios, methods, training, evaluation, and the jobs behind `fit`, `add-task`, `evaluate`."""

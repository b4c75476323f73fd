"""Stage 11: the HTTP inspection service (`moleflow serve`) and its browser page."""

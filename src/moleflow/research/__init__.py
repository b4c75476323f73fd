"""Stage 9: experiment grids, run comparisons and analyses."""

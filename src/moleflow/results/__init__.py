"""Stage 7: typed results, their tables, plots and HTML page, and the run directory."""

"""Human annotations to strict preference pairs (the annotate-import stage)."""

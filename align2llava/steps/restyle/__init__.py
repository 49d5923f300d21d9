"""Rewrite and review by the inner LLM of the model being tuned (the restyle stage)."""

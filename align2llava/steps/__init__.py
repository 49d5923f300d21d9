"""The method, one module or package per step: annotations, reward training, scoring, selection, restyle, fine-tuning, evaluation."""

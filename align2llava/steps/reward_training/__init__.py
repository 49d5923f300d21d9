"""Training the question and answer reward models (the train-reward stage)."""

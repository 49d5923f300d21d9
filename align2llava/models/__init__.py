"""Model plumbing: loading checkpoints, precision, chat templates, LoRA targets, the reward model."""

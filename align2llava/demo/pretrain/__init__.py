"""Pretraining the demo base MLLM (the pretrain stage), or passing a user's checkpoint through."""

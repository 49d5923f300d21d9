"""Visual instruction tuning of the MLLM on the curated set (the finetune stage)."""

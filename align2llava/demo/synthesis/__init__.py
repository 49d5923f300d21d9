"""The demo world built from easy-vqa: pool, simulated annotations, benchmark (the synthesize stage)."""

"""align2llava: curate multimodal instruction data with the Align²LLaVA method.

The package is a library first; `stages/` and the `align2llava` command are thin Click
layers over it. Nothing heavy is imported here: torch and transformers are imported inside
the functions that need them, so `--help` stays fast.
"""

__version__ = "0.1.0"

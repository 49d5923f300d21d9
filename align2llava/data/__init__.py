"""The data contract: LLaVA records, reading and writing them, images, rejected records."""

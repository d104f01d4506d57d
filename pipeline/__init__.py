"""gan-pipeline: distributed training of conditional GANs."""

"""Evaluation: FID, KID, precision/recall, intra-FID and accuracy with a pluggable feature network.

Reading path: cli.py (`gan-eval`) -> evaluate.py (samples, features, protocol) -> scores.py (the metrics)
-> features.py (which network embeds the images: inception.py or domain_net.py) -> reference.py
(the real images' features, cached on disk). callback.py runs the same evaluation during training.
"""

"""Diagnostics of trained generators and their images: statistics that are not training losses or FID."""

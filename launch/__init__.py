"""Launchers: turn a gan-train command line into torchrun processes (local simulated nodes; Kubernetes later)."""

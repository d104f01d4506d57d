"""`gan-launch k8s`: multi-node gan-train jobs on Kubernetes (an Indexed Job + headless Service, a Kubeflow
PyTorchJob, or a Kubeflow Trainer TrainJob). render.py builds the manifests, validate.py checks them offline,
client.py talks to the cluster, command.py is what runs in each pod."""
from launch.k8s.client import Apis, apply, delete, logs, status
from launch.k8s.command import container_command, node_env, pod_env
from launch.k8s.render import TARGETS, render_job
from launch.k8s.validate import ManifestError, validate_manifests

__all__ = ["TARGETS", "Apis", "ManifestError", "apply", "container_command", "delete", "logs", "node_env",
           "pod_env", "render_job", "status", "validate_manifests"]

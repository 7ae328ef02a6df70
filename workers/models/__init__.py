"""Model interface, loaders (TorchScript, MONAI bundle), pipelines and the per-process registry."""

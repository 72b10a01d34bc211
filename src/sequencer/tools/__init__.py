"""Analysis and deployment commands: ERF, ImageNet-C robustness, resolution sweeps, export, predict, checkpoints."""

"""`dimple-train`: the training entry point (stages align, instruct, diffusion) on transformers' Trainer."""

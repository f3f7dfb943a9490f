"""Evaluation with lmms-eval: the `--model dimple` plugin, its settings, and the local shapes task."""

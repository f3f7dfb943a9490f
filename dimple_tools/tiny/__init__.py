"""The tiny Dimple's world: the shapes task, its tokenizer, tiny configs, and the build that trains the model."""

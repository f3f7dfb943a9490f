"""Building and checking real checkpoints: initialising Dimple from its parts, the 7B layout, the Qwen2 tokenizer."""

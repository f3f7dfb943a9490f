"""Demos: the command-line demo, the gradio web demo, and the decoding-trajectory picture."""

"""Checkpoint loading: HF folders (safetensors), GGUF files, and the embedded default model.

May import `runtime.model` (to build the model) and `runtime.text`; nothing above.
"""

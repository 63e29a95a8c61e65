"""raybooth: DreamBooth fine-tuning of Stable Diffusion on Ray."""

__version__ = "0.1.0"

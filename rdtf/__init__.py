"""RDTF: animated stickers from static stickers and short descriptions.

A small kit around an I2VGen-XL-family video diffusion model: sticker file I/O, the
built-in sticker set, dataset preparation, task masks, the multitask sampler, LoRA
training, evaluation and notebook widgets. See README.md for the tour.
"""

__version__ = "0.1.0"

"""Segmentation networks for the training package. Present so far: the 2D UNet of the ACTION papers."""
from action.models.unet import UNet2D

__all__ = ["UNet2D"]

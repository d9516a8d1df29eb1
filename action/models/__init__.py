"""Segmentation networks and the ACTION heads: the papers' 2D UNet, its 3D form, projection / predictor /
representation heads, the EMA teacher, and build_network (the network a config trains)."""
from action.models.ema import EMATeacher
from action.models.factory import build_network
from action.models.heads import PredictorHead, ProjectionHead, RepresentationHead
from action.models.unet import UNet, UNet2D, UNet3D

__all__ = ["EMATeacher", "PredictorHead", "ProjectionHead", "RepresentationHead", "UNet", "UNet2D", "UNet3D",
           "build_network"]

"""Sliding-window prediction shared by validation, evaluation and segmentation."""

from __future__ import annotations

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from lowlabel.config import RunConfig
from lowlabel.data.transforms import patch_shape
from lowlabel.device import Placement


class SliceModel(nn.Module):
    """Runs a 2D network on ``(B, C, H, W, 1)`` windows, so 2D and 3D share one inferer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[..., 0])[..., None]


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """Logits for one preprocessed volume, computed on the model's device.

    The volume goes to the device too when it fits (else windows are copied there one batch
    at a time and stitched on the CPU).

    Args:
        image: ``(1, X, Y, Z)`` preprocessed scan.

    Returns:
        ``(C, X, Y, Z)`` float32 logits on the same grid, on the CPU.
    """
    predictor = SliceModel(model) if cfg.data.spatial_dims == 2 else model
    roi = patch_shape(cfg.data)
    sw_batch = cfg.train.sw_batch_size * (8 if cfg.data.spatial_dims == 2 else 1)
    place = Placement.of_model(model, cfg.train.precision)
    image = image[None].float()
    # input, logits, the stitching buffers: about a dozen float copies of the volume
    if place.fits(12 * 4 * image.numel()):
        image = place.to(image)
    was_training = model.training
    model.eval()
    try:
        with place.autocast():
            out = sliding_window_inference(
                image,
                roi,
                sw_batch,
                predictor,
                overlap=cfg.train.sw_overlap,
                mode="gaussian",
                sw_device=place.device,
                device=image.device,
            )
    finally:
        model.train(was_training)
    return out[0].float().cpu()

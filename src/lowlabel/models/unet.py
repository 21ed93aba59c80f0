"""The segmentation network, built from config.

MONAI's ``UNet`` nests each level inside the previous one;
:func:`lowlabel.models.transfer.encoder_blocks` names the encoder block of every level so transfer
can map levels explicitly instead of by key string.
"""

from __future__ import annotations

from torch import nn

from lowlabel.config import ModelConfig

N_CLASSES = 4  # background, CSF, GM, WM


def level_channels(cfg: ModelConfig) -> list[int]:
    return [cfg.channels * 2**i for i in range(cfg.levels)]


def deep_supervision_heads(cfg: ModelConfig) -> int:
    """Extra output heads of a deeply supervised ``DynUNet``: every decoder level but the
    lowest, as in nnU-Net (0 without deep supervision)."""
    return cfg.levels - 2 if cfg.deep_supervision else 0


def build_model(
    cfg: ModelConfig,
    spatial_dims: int,
    in_channels: int = 1,
    out_channels: int = N_CLASSES,
    deep_supervision: bool = True,
) -> nn.Module:
    """A MONAI ``UNet`` (or ``DynUNet``, nnU-Net's network: instance norm, leaky ReLU) with
    ``cfg.levels`` levels.

    Input ``(B, in_channels, H, W[, D])``; output logits ``(B, out_channels, H, W[, D])``. A
    ``DynUNet`` with ``cfg.deep_supervision`` (and ``deep_supervision`` left on) returns, in
    training mode only, ``(B, 1 + heads, out_channels, H, W[, D])``: the top head first, then
    the lower heads upsampled to full size (:func:`deep_supervision_heads`).
    """
    channels = level_channels(cfg)
    if cfg.name == "dynunet":
        from monai.networks.nets import DynUNet

        strides = [1] + [2] * (cfg.levels - 1)
        return DynUNet(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=[3] * cfg.levels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=channels,
            dropout=cfg.dropout or None,
            norm_name=cfg.norm,
            res_block=cfg.num_res_units > 0,
            deep_supervision=deep_supervision and cfg.deep_supervision,
            deep_supr_num=max(deep_supervision_heads(cfg), 1),
        )
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims,
        in_channels,
        out_channels,
        channels=channels,
        strides=[2] * (cfg.levels - 1),
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
        norm=cfg.norm,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

"""Parameters and multiply-accumulates, counted the way the ViG paper counts them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["model_stats"]


def model_stats(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> dict[str, int]:
    """``params`` (trainable), ``params_all`` and ``macs`` of one ``input_size`` image.

    MACs count matrix products and convolutions, the kNN distance matrix included, as the paper's FLOPs
    do (spec section 5); topk, gathers and element-wise ops are not counted. The count runs one forward
    pass in eval mode under ``torch.no_grad``; the model's mode is restored afterwards.
    """
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params_all = sum(p.numel() for p in model.parameters())
    was_training = model.training
    device = next(model.parameters()).device
    x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": params, "params_all": params_all, "macs": counter.get_total_flops() // 2}

"""Cheap, generic statistics of the model's own input pixels, for the second OOD detector.

    vectors = image_statistics(pixel_values, mean, std)   # (N, 3, H, W) normalised input -> (N, D)

The statistics describe what an image looks like, not what it shows, and know nothing of
any dataset: a density fitted on them (vqa/reliability/ood.py, the same Ledoit-Wolf
Mahalanobis as the CNN features) learns from the training images alone what "looks like
home" means. They are taken on the letterboxed model input (what the CNN sees, padding
included), after undoing the normalisation, so pixels are RGB in [0, 1]:

- per-channel histograms, 16 bins each (48 values);
- a joint colour histogram, 4 x 4 x 4 bins (64 values): which colours occur together;
- a histogram of the luma gradient magnitude, 12 bins on a log scale (12 values): flat
  areas and sharp edges against texture, noise and blur;
- a histogram of the local luma contrast (each pixel against its 3 x 3 neighbourhood mean),
  12 bins on a log scale (12 values): texture and grain;
- the coarse layout: the mean colour of each cell of a 4 x 4 grid (48 values).

Every histogram is a share of pixels, kept as its square root (the Hellinger embedding:
Euclidean distance between square roots is the Hellinger distance), so each histogram block
has unit length; the layout block is divided by sqrt(48) so that it is at most 1 long too.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

CHANNEL_BINS = 16
JOINT_BINS = 4
EDGE_BINS = 12  # gradient and contrast histograms: bin 0 is "flat" (< 1/256), then log-spaced up to 1
GRID = 4
DIM = 3 * CHANNEL_BINS + JOINT_BINS**3 + 2 * EDGE_BINS + 3 * GRID * GRID
_LUMA = (0.299, 0.587, 0.114)


def _log_edges() -> torch.Tensor:
    """Inner bin edges of the gradient / contrast histograms: 1/256 .. 1, log-spaced."""
    return torch.logspace(math.log10(1 / 256), 0, EDGE_BINS - 1, dtype=torch.float64).float()


def _histogram(values: torch.Tensor, edges: torch.Tensor, bins: int) -> torch.Tensor:
    """(N, P) values -> (N, bins) share of each bucket (`edges` are the bins - 1 inner edges)."""
    index = torch.bucketize(values.contiguous(), edges)
    counts = torch.zeros(values.shape[0], bins, dtype=torch.float32)
    counts.scatter_add_(1, index, torch.ones_like(values, dtype=torch.float32))
    return counts / values.shape[1]


@torch.inference_mode()
def image_statistics(pixel_values: torch.Tensor, mean, std) -> np.ndarray:
    """(N, DIM) float32 statistics of (N, 3, H, W) model inputs normalised with `mean` and `std`."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) pixels, got shape {tuple(pixel_values.shape)}")
    x = pixel_values.detach().float().cpu()
    x = (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1)
    n = x.shape[0]
    flat = x.reshape(n, 3, -1)
    channel_edges = torch.linspace(0, 1, CHANNEL_BINS + 1)[1:-1]
    channels = torch.cat([_histogram(flat[:, c], channel_edges, CHANNEL_BINS) for c in range(3)], dim=1)
    quantised = (flat * JOINT_BINS).long().clamp(max=JOINT_BINS - 1)  # (N, 3, P)
    code = (quantised[:, 0] * JOINT_BINS + quantised[:, 1]) * JOINT_BINS + quantised[:, 2]
    joint = torch.zeros(n, JOINT_BINS**3).scatter_add_(1, code, torch.ones_like(code, dtype=torch.float32))
    joint /= code.shape[1]
    luma = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (N, 1, H, W)
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    dx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    dy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    edges = _log_edges()
    gradient = _histogram(torch.hypot(dx, dy).reshape(n, -1), edges, EDGE_BINS)
    contrast = (luma - F.avg_pool2d(padded, 3, stride=1)).abs()
    contrast = _histogram(contrast.reshape(n, -1), edges, EDGE_BINS)
    layout = F.adaptive_avg_pool2d(x, GRID).reshape(n, -1) / math.sqrt(3 * GRID * GRID)
    out = torch.cat([channels.sqrt(), joint.sqrt(), gradient.sqrt(), contrast.sqrt(), layout], dim=1)
    return out.numpy().astype(np.float32)

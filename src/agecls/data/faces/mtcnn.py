"""MTCNN (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks"): three small CNNs in a cascade that find faces and five landmarks (eyes, nose, mouth corners).

Our own implementation of the paper's cascade; the weights are the original authors' trained models as
converted by facenet-pytorch (MIT licence, see NOTICE beside them), shipped in mtcnn.npz: nothing is
downloaded. The cascade: P-Net scans an image pyramid for 12x12 face candidates, R-Net re-scores and refines
each candidate at 24x24, O-Net at 48x48 gives the final box, score and landmarks. Inputs are RGB uint8.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.ops import nms, roi_align

WEIGHTS = Path(__file__).with_name("mtcnn.npz")


def _conv_stack(channels: list[int], kernels: list[int], pools: list[tuple[int, int] | None]) -> nn.Module:
    """conv -> PReLU (-> max pool) blocks named as the weights are (conv1, prelu1, pool1, ...)."""
    layers = nn.Module()
    for i, (c_in, c_out, k, pool) in enumerate(
        zip(channels[:-1], channels[1:], kernels, pools, strict=True), 1
    ):
        layers.add_module(f"conv{i}", nn.Conv2d(c_in, c_out, k))
        layers.add_module(f"prelu{i}", nn.PReLU(c_out))
        if pool:
            layers.add_module(f"pool{i}", nn.MaxPool2d(pool[0], pool[1], ceil_mode=True))
    return layers


def _run_stack(stack: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for layer in stack.children():
        x = layer(x)
    return x


class PNet(nn.Module):
    """Proposal net: fully convolutional, a face score and a box offset per 12x12 window (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _conv_stack([3, 10, 16, 32], [3, 3, 3], [(2, 2), None, None])
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _run_stack(self.trunk, x)
        return torch.softmax(self.conv4_1(x), dim=1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """Refine net: 24x24 candidates re-scored, their boxes corrected."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _conv_stack([3, 28, 48, 64], [3, 3, 2], [(3, 2), (3, 2), None])
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the converted weights flatten in the original framework's (width, height, channel) order
        x = _run_stack(self.trunk, x).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu4(self.dense4(x))
        return torch.softmax(self.dense5_1(x), dim=1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """Output net: 48x48 candidates, final score, box and five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _conv_stack([3, 32, 64, 64, 128], [3, 3, 3, 2], [(3, 2), (3, 2), (2, 2), None])
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = _run_stack(self.trunk, x).permute(0, 3, 2, 1).flatten(1)
        x = self.prelu5(self.dense5(x))
        return torch.softmax(self.dense6_1(x), dim=1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def _load(net: nn.Module, name: str, weights: dict[str, np.ndarray]) -> nn.Module:
    state = {}
    for key in net.state_dict():
        stored = f"{name}.{key.removeprefix('trunk.')}"
        state[key] = torch.from_numpy(weights[stored])
    net.load_state_dict(state)
    return net.eval()


@functools.cache
def nets() -> tuple[PNet, RNet, ONet]:
    """The three nets with their shipped weights (loaded once per process)."""
    with np.load(WEIGHTS) as w:
        weights = {k: w[k] for k in w.files}
    return _load(PNet(), "pnet", weights), _load(RNet(), "rnet", weights), _load(ONet(), "onet", weights)


@dataclass(frozen=True)
class Detection:
    """A face: box (x, y, w, h) in pixels, score 0-1, landmarks (5, 2): left eye, right eye (as seen in the
    image), nose, left and right mouth corner."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray


def _scales(height: int, width: int, min_face: int, factor: float = 0.709) -> list[float]:
    """Pyramid scales: a min_face face becomes 12 px (P-Net's window) at the first, each 0.709x the last."""
    scale, scales = 12.0 / min_face, []
    while min(height, width) * scale >= 12:
        scales.append(scale)
        scale *= factor
    return scales


def _normalise(img: torch.Tensor) -> torch.Tensor:
    return (img - 127.5) * 0.0078125


def _propose(image: torch.Tensor, min_face: int, threshold: float) -> torch.Tensor:
    """P-Net over the pyramid: candidate boxes (N, 5: x1, y1, x2, y2, score), offsets applied, squared."""
    pnet = nets()[0]
    _, _, h, w = image.shape
    found = []
    for scale in _scales(h, w, min_face):
        size = (math.ceil(h * scale), math.ceil(w * scale))
        probs, offsets = pnet(_normalise(F.interpolate(image, size=size, mode="area")))
        ys, xs = torch.nonzero(probs[0] >= threshold, as_tuple=True)
        if not len(ys):
            continue
        cells = torch.stack([xs, ys], dim=1).float()
        top_left, bottom_right = ((2 * cells + 1) / scale).floor(), ((2 * cells + 12) / scale).floor()
        score = probs[0, ys, xs]
        boxes = torch.cat([top_left, bottom_right, score[:, None], offsets[0, :, ys, xs].T], dim=1)
        found.append(boxes[nms(boxes[:, :4], score, 0.5)])
    if not found:
        return torch.zeros((0, 5))
    boxes = torch.cat(found)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
    return _square(_shift(boxes[:, :5], boxes[:, 5:9]))


def _shift(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Boxes moved by the nets' regression offsets (fractions of the box side)."""
    wh = (boxes[:, 2:4] - boxes[:, 0:2] + 1).repeat(1, 2)
    return torch.cat([boxes[:, :4] + offsets * wh, boxes[:, 4:5]], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Each box made square about its centre (side = its longer side), as the next net expects."""
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    side = wh.max(dim=1).values
    top_left = boxes[:, 0:2] + wh / 2 - side[:, None] / 2
    return torch.cat([top_left, top_left + side[:, None], boxes[:, 4:5]], dim=1)


def _patches(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box cut out (zeros outside the image) and resized to size x size, normalised: one bilinear
    RoIAlign over every box at once."""
    corners = boxes[:, :4].floor()
    corners[:, 2:] += 1  # the boxes' pixel ranges are inclusive
    rois = torch.cat([torch.zeros((len(boxes), 1)), corners], dim=1)
    return _normalise(roi_align(image, rois, (size, size), spatial_scale=1.0, sampling_ratio=2))


def _refine(image: torch.Tensor, boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-Net: candidates re-scored at 24x24, kept above threshold, offsets applied, squared."""
    if not len(boxes):
        return boxes
    probs, offsets = nets()[1](_patches(image, boxes, 24))
    keep = probs >= threshold
    boxes = torch.cat([boxes[keep, :4], probs[keep, None]], dim=1)
    offsets = offsets[keep]
    order = nms(boxes[:, :4], boxes[:, 4], 0.7)
    return _square(_shift(boxes[order], offsets[order]))


def _output(image: torch.Tensor, boxes: torch.Tensor, threshold: float) -> list[Detection]:
    """O-Net: final scores, boxes and landmarks; overlapping boxes merged by the smaller-area overlap."""
    if not len(boxes):
        return []
    probs, offsets, marks = nets()[2](_patches(image, boxes, 48))
    keep = probs >= threshold
    boxes, offsets, marks, probs = boxes[keep], offsets[keep], marks[keep], probs[keep]
    wh = boxes[:, 2:4] - boxes[:, 0:2] + 1
    xs = boxes[:, 0:1] + marks[:, 0:5] * wh[:, 0:1] - 1
    ys = boxes[:, 1:2] + marks[:, 5:10] * wh[:, 1:2] - 1
    boxes = _shift(torch.cat([boxes[:, :4], probs[:, None]], dim=1), offsets)
    kept = _nms_min(boxes, 0.7)
    return [
        Detection(
            (float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])),
            float(b[4]),
            torch.stack([xs[i], ys[i]], dim=1).numpy().astype(np.float32),
        )
        for i, b in ((int(i), boxes[i]) for i in kept)
    ]


def _nms_min(boxes: torch.Tensor, threshold: float) -> list[int]:
    """Non-maximum suppression by intersection over the smaller box: a box mostly inside a higher-scored
    one is the same face."""
    order = torch.argsort(boxes[:, 4], descending=True)
    b = boxes[order]
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iw = torch.minimum(b[:, None, 2], b[None, :, 2]) - torch.maximum(b[:, None, 0], b[None, :, 0]) + 1
    ih = torch.minimum(b[:, None, 3], b[None, :, 3]) - torch.maximum(b[:, None, 1], b[None, :, 1]) + 1
    overlap = iw.clamp(min=0) * ih.clamp(min=0) / torch.minimum(area[:, None], area[None, :])
    same = (overlap > threshold).tolist()
    gone = [False] * len(b)
    kept: list[int] = []
    for i in range(len(b)):  # in score order: a box survives unless a kept, higher one covers it
        if not gone[i]:
            kept.append(int(order[i]))
            gone = [g or s for g, s in zip(gone, same[i], strict=True)]
    return kept


@torch.inference_mode()
def detect(
    rgb: np.ndarray, min_face: int = 24, thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
) -> list[Detection]:
    """Every face of an (H, W, 3) RGB uint8 image, highest score first."""
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    boxes = _propose(image, max(12, min_face), thresholds[0])
    boxes = _refine(image, boxes, thresholds[1])
    return _output(image, boxes, thresholds[2])

"""Saliency maps: Grad-CAM per task head of the reference classifier, and spectral residual.

Both return float32 maps ``N×H×W`` in [0, 1] at the images' size, from uint8 ``N×H×W×3`` images.

**Grad-CAM** (Selvaraju et al. 2017) of a :class:`~porcelain.models.classifier.MultiTaskClassifier`
(a timm backbone, one ``Dropout -> Linear`` head per task). The target layer is the backbone's last
feature map before global pooling — the output of timm's ``backbone.forward_features`` — and the
score is one task head's logit, so each task gets its own map. For the feature map ``A`` (``K×h×w``)
and the score ``s`` of class ``c``::

    alpha_k = mean_{i,j} d s / d A_k[i, j]
    cam     = relu(sum_k alpha_k A_k)      -> bilinear up-sampling to H×W -> divided by its max

A map whose ``relu`` is zero everywhere (nothing supports the class) stays all zeros. The model
runs in eval mode (dropout off, BatchNorm statistics frozen), so the images of a batch do not
interact and ``batch_size`` does not change the maps. The pip package ``grad-cam``
(``pytorch_grad_cam``) is not used: it is not installed in this environment, and the two timm calls
above are all that is needed. A backbone whose last feature map is 1×1 (a stride-32 network on a
32 px image) gives maps without spatial information; prefer a backbone with a smaller total stride.

**Spectral residual** (Hou & Zhang, CVPR 2007), a cheap saliency that needs no classifier: the
grey image is resized to ``64×64`` and mirrored to ``128×128`` (see below); ``L = log(|FFT| + eps)``,
the residual ``R = L - mean3×3(L)``; the saliency is ``|IFFT(exp(R + i·phase))|²``, blurred with a
Gaussian of ``sigma`` = 8 pixels of the 64 px working size (the paper's σ; the authors' MATLAB
snippet uses 2.5), cropped back to the image, resized to ``H×W`` and min-max normalised. A flat
image (no contrast) gives zeros.

The FFT treats the image as periodic: an object that touches the border (a digit scan filling its
frame, a vessel cut by the top edge) makes a jump between opposite edges that the residual takes
for the most salient thing in the image. Without the mirror, on the digits scans the Otsu mask of
the map covered 6% of the image and 9% of the strokes, mostly a band at the top and bottom edge,
and SGD-Mix with those masks pasted its sources into barely covered targets (70% of labels
drifted at S = 0.3). Mirroring makes the image periodic and continuous at its edges; with σ = 8
the masks cover 58% of the digits' strokes (precision 0.53) and 78% of the sample's vessels
(precision 0.71; was 24% at 0.43): ``benchmarks/saliency_speed.py``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from porcelain.device import choose_device
from porcelain.models.classifier import MultiTaskClassifier, head_key

__all__ = ["SR_EPS", "SR_SIZE", "SR_SIGMA", "gradcam_maps", "spectral_residual_maps"]

SR_SIZE = 64
"""Working size of the spectral residual (Hou & Zhang resize to 64 px)."""
SR_SIGMA = 8.0
"""Gaussian blur of the spectral-residual map, in pixels of the working size (Hou & Zhang's σ = 8)."""
SR_EPS = 1e-2
"""Floor added to the amplitude spectrum (grey values in [0, 1]) before the log. Synthetic images
(a square on a flat background) have exact spectral zeros whose ``log`` would dominate the residual
(with 1e-8 a planted square scored below the background; with 1e-2 it scores ~3x it)."""


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 array N×H×W×3, got {getattr(images, 'shape', None)} "
                         f"{getattr(images, 'dtype', None)}")


def gradcam_maps(
    model: MultiTaskClassifier,
    images_uint8_nhwc: np.ndarray,
    task_index: int,
    *,
    classes: np.ndarray | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> np.ndarray:
    """Grad-CAM maps (float32 ``N×H×W`` in [0, 1]) of the head of task ``task_index``.

    ``classes``: the class whose logit is explained, per image (int ``N``), e.g. the source labels;
    ``None`` explains each image's predicted class. The model is moved to ``device`` (as
    ``porcelain.train.classifier.predict`` does) and left in the train/eval mode it had.
    """
    _check_images(images_uint8_nhwc)
    if not 0 <= task_index < len(model.task_names):
        raise ValueError(f"task_index {task_index} out of range for tasks {model.task_names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, h, w, _ = images_uint8_nhwc.shape
    task = model.task_names[task_index]
    if classes is not None:
        classes = np.asarray(classes, dtype=np.int64)
        if classes.shape != (n,):
            raise ValueError(f"classes must have one entry per image ({n}), got shape {classes.shape}")
        if (classes < 0).any() or (classes >= model.num_classes[task]).any():
            raise ValueError(f"classes must be in [0, {model.num_classes[task]}) for task {task!r}")
    out = np.zeros((n, h, w), dtype=np.float32)
    if n == 0:
        return out
    dev = choose_device(device)
    was_training = model.training
    model.to(dev).eval()
    backbone, head = model.backbone, model.heads[head_key(task)]
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = model.preprocess(images_uint8_nhwc[start:stop])
            with torch.enable_grad():
                feats = backbone.forward_features(x)
                if feats.ndim != 4:
                    raise ValueError(f"backbone.forward_features gave shape {tuple(feats.shape)}; Grad-CAM "
                                     "needs a feature map B×C×h×w")
                logits = head(backbone.forward_head(feats))
                idx = (logits.argmax(1) if classes is None
                       else torch.as_tensor(classes[start:stop], device=logits.device))
                score = logits.gather(1, idx.view(-1, 1)).sum()  # images are independent in eval mode
                (grad,) = torch.autograd.grad(score, feats)
            with torch.no_grad():
                alpha = grad.float().mean(dim=(2, 3), keepdim=True)
                cam = F.relu((alpha * feats.float()).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
                cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
            out[start:stop] = cam.clamp_(0, 1).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``N×H×W`` maps (radius ⌈3σ⌉, mirror padding without repeating the edge)."""
    if sigma <= 0:
        return maps
    from scipy.ndimage import gaussian_filter1d

    for axis in (1, 2):
        maps = gaussian_filter1d(maps, sigma, axis=axis, mode="mirror", truncate=3.0)
    return maps


def spectral_residual_maps(images: np.ndarray, *, size: int = SR_SIZE, sigma: float = SR_SIGMA) -> np.ndarray:
    """Spectral-residual saliency (float32 ``N×H×W`` in [0, 1]) of uint8 ``N×H×W×3`` images."""
    _check_images(images)
    n, h, w, _ = images.shape
    if n == 0:
        return np.zeros((0, h, w), dtype=np.float32)
    if size < 4:
        raise ValueError(f"size must be >= 4, got {size}")
    grey = torch.from_numpy(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0)
    small = F.interpolate(grey[:, None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=(h > size or w > size))[:, 0].double().numpy()
    flat_image = np.ptp(small.reshape(n, -1), axis=1) < 1e-6
    # mirrored to 2size × 2size: periodic and continuous at the image's edges (no wrap-around jump)
    wide = np.concatenate([small, small[:, ::-1]], axis=1)
    wide = np.concatenate([wide, wide[:, :, ::-1]], axis=2)
    m = 2 * size
    spec = np.fft.fft2(wide)
    log_amp = np.log(np.abs(spec) + SR_EPS)
    phase = np.angle(spec)
    p = np.pad(log_amp, ((0, 0), (1, 1), (1, 1)), mode="wrap")  # the spectrum is periodic
    mean3 = sum(p[:, i:i + m, j:j + m] for i in range(3) for j in range(3)) / 9.0
    sal = np.abs(np.fft.ifft2(np.exp(log_amp - mean3 + 1j * phase))) ** 2
    sal = np.ascontiguousarray(_blur(sal, sigma)[:, :size, :size])  # blurred on the mirror, so edges see both sides
    big = F.interpolate(torch.from_numpy(sal)[:, None], size=(h, w), mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    flat = big.reshape(n, -1)
    lo, hi = flat.min(1, keepdims=True), flat.max(1, keepdims=True)
    ok = (hi - lo > 0) & ~flat_image[:, None]
    norm = np.where(ok, (flat - lo) / np.where(ok, hi - lo, 1.0), 0.0)
    return norm.reshape(n, h, w).astype(np.float32)

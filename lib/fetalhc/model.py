"""Mask R-CNN models (torchvision) built from named configs, and their checkpoints."""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models import mobilenet_v3_large, resnet18, resnet50, resnet101
from torchvision.models.resnet import BasicBlock
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .refine import Refiner

CHECKPOINT_FORMAT = "fetalhc-maskrcnn/1"
# Detections kept per image (after NMS): the pipeline measures the best one, and the runner-ups only when
# the best fails QC (fetalhc.pipeline).
CANDIDATES = 3


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or of another model config."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backbone: str  # resnet50 | resnet101 | mobilenet_v3_large | resnet18_slim
    input_size: int  # images are scaled so their long side is this many pixels
    fpn_channels: int = 256
    anchor_sizes: tuple = ((16,), (32,), (64,), (128,), (256,))
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    box_head_dim: int = 1024
    mask_head_layers: tuple = (256, 256, 256, 256)
    mask_roi: int = 14  # RoIAlign size for the mask head; the predicted mask is twice this
    mask_loss_weight: float = 1.0
    # One head per image: far fewer proposals/RoIs than COCO defaults keep CPU steps fast.
    rpn_proposals: tuple = (1000, 500, 500, 100)  # pre/post-NMS train, pre/post-NMS test
    rois_per_image: int = 128
    extra: dict = field(default_factory=dict)


CONFIGS: dict[str, ModelConfig] = {
    # The thesis configuration: ResNet50 + FPN with anchors 16..256 at the HC18 resolution.
    "resnet50_fpn": ModelConfig("resnet50_fpn", "resnet50", input_size=800),
    "resnet101_fpn": ModelConfig("resnet101_fpn", "resnet101", input_size=800),
    # CPU-trainable default: heads fill 15-70 % of the frame, so anchors cover 24-288 px at 320 px,
    # with near-round aspect ratios; 128-channel FPN and light heads keep it near 6 M parameters.
    "mobilenet_v3_fpn": ModelConfig(
        "mobilenet_v3_fpn", "mobilenet_v3_large", input_size=320, fpn_channels=128,
        anchor_sizes=((24, 36), (48, 72), (96, 144), (192, 288)), aspect_ratios=(0.6, 1.0, 1.6),
        box_head_dim=512, mask_head_layers=(128, 128, 128, 128), mask_roi=14),
    # The same at 480 px (anchors scaled with it), for the thin skull ring of early heads. Tried, not shipped:
    # no better on development images (models/protocol/stage1_480/).
    "mobilenet_v3_fpn_480": ModelConfig(
        "mobilenet_v3_fpn_480", "mobilenet_v3_large", input_size=480, fpn_channels=128,
        anchor_sizes=((36, 54), (72, 108), (144, 216), (288, 432)), aspect_ratios=(0.6, 1.0, 1.6),
        box_head_dim=512, mask_head_layers=(128, 128, 128, 128), mask_roi=14),
    # A ResNet18 first stage sized for CPU: the last stage at 256 instead of 512 channels (it alone holds
    # 8.4 M of ResNet18's 11.2 M weights), outputs at strides 8/16/32 as the MobileNet's, same heads.
    "resnet18_slim_fpn": ModelConfig(
        "resnet18_slim_fpn", "resnet18_slim", input_size=320, fpn_channels=128,
        anchor_sizes=((24, 36), (48, 72), (96, 144), (192, 288)), aspect_ratios=(0.6, 1.0, 1.6),
        box_head_dim=512, mask_head_layers=(128, 128, 128, 128), mask_roi=14),
}
# The shipped first stage since session 15: on fresh exams it misses a head grossly less often than the
# MobileNet (models/protocol/stage1_r18slim/, r18slim_procedure/).
DEFAULT_CONFIG = "resnet18_slim_fpn"


def _norm(num_features: int) -> nn.Module:
    # Trainable statistics: FrozenBatchNorm2d without pretrained weights would freeze identity stats.
    return nn.BatchNorm2d(num_features)


def _mobilenet_fpn(cfg: ModelConfig, pretrained_backbone: bool) -> BackboneWithFPN:
    weights = "IMAGENET1K_V1" if pretrained_backbone else None
    features = mobilenet_v3_large(weights=weights, norm_layer=_norm).features
    # Outputs at the end of the stride-8, stride-16 and stride-32 stages (blocks flagged _is_cn start a
    # new, down-sampled stage, so the block before each one ends the previous stage).
    starts = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    picks = [starts[-2] - 1, starts[-1] - 1, len(features) - 1]
    return_layers = {str(idx): str(k) for k, idx in enumerate(picks)}
    in_channels = [features[i].out_channels for i in picks]
    return BackboneWithFPN(features, return_layers, in_channels, cfg.fpn_channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=None)


def _resnet_fpn(cfg: ModelConfig, pretrained_backbone: bool) -> BackboneWithFPN:
    weights = "IMAGENET1K_V1" if pretrained_backbone else None
    body = {"resnet50": resnet50, "resnet101": resnet101}[cfg.backbone](weights=weights, norm_layer=_norm)
    return_layers = {f"layer{k + 1}": str(k) for k in range(4)}
    return BackboneWithFPN(body, return_layers, [256, 512, 1024, 2048], cfg.fpn_channels,
                           extra_blocks=LastLevelMaxPool())


def _resnet18_slim_fpn(cfg: ModelConfig) -> BackboneWithFPN:
    # The layers after layer4 (pooling, classifier) are dropped by BackboneWithFPN.
    body = resnet18(weights=None, norm_layer=_norm)
    body.inplanes = 256
    body.layer4 = body._make_layer(BasicBlock, 256, 2, stride=2)
    return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
    return BackboneWithFPN(body, return_layers, [128, 256, 256], cfg.fpn_channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=None)


def build_model(config: str | ModelConfig = DEFAULT_CONFIG, num_classes: int = 2,
                pretrained_backbone: bool = False) -> MaskRCNN:
    """Mask R-CNN for one foreground class (fetal head). ``pretrained_backbone`` loads torchvision's
    ImageNet weights from the local torch cache for users who have them; it is never required."""
    cfg = CONFIGS[config] if isinstance(config, str) else config
    if cfg.backbone == "resnet18_slim":
        if pretrained_backbone:
            raise ValueError(f"config {cfg.name}: no ImageNet weights exist for its slimmed ResNet18")
        backbone = _resnet18_slim_fpn(cfg)
        names = ["0", "1", "2"]
    elif cfg.backbone.startswith("resnet"):
        backbone = _resnet_fpn(cfg, pretrained_backbone)
        names = ["0", "1", "2", "3"]
    elif cfg.backbone == "mobilenet_v3_large":
        backbone = _mobilenet_fpn(cfg, pretrained_backbone)
        names = ["0", "1", "2"]
    else:
        raise ValueError(f"unknown backbone {cfg.backbone!r}")
    n_levels = len(names) + 1  # + the max-pool level
    sizes = tuple(cfg.anchor_sizes)
    if len(sizes) != n_levels:
        raise ValueError(f"config {cfg.name}: {len(sizes)} anchor levels for {n_levels} feature maps")
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(tuple(cfg.aspect_ratios),) * n_levels)
    c = cfg.fpn_channels
    model = MaskRCNN(
        backbone, num_classes=None,
        min_size=cfg.input_size, max_size=cfg.input_size,
        # Grey ultrasound replicated to 3 channels; intensity statistics of HC18 images.
        image_mean=[0.2, 0.2, 0.2], image_std=[0.2, 0.2, 0.2],
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, 7, 2),
        box_head=TwoMLPHead(c * 7 * 7, cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(cfg.box_head_dim, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(names, cfg.mask_roi, 2),
        mask_head=MaskRCNNHeads(c, list(cfg.mask_head_layers), 1, norm_layer=None),
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_layers[-1], cfg.mask_head_layers[-1], num_classes),
        box_detections_per_img=CANDIDATES,
        rpn_pre_nms_top_n_train=cfg.rpn_proposals[0], rpn_post_nms_top_n_train=cfg.rpn_proposals[1],
        rpn_pre_nms_top_n_test=cfg.rpn_proposals[2], rpn_post_nms_top_n_test=cfg.rpn_proposals[3],
        box_batch_size_per_image=cfg.rois_per_image,
    )
    model.fetalhc_config = cfg
    model.fetalhc_refiner = None  # optional second stage (fetalhc.refine), set from a checkpoint
    return model


def paste_mask(mask: torch.Tensor, box, resized_hw: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """The M x M mask probabilities of one detection at full resolution, without torchvision's size bias.

    torchvision's ``paste_masks_in_image`` stretches the mask over ``int(w) + 1`` whole pixels from a
    truncated box corner: about one pixel too wide and tall, shifted by up to a pixel, so HC comes out
    about pi pixels too long. Here every output pixel samples the mask where it lies: training targets
    are cut with ``roi_align(aligned=False)``, so bin j covers box coordinates
    ``x0 + [j, j + 1) * w / M`` with pixel centres at integer coordinates of the resized image, and the
    resize maps pixel edges linearly (centre ``c`` resized -> ``(c + 0.5) * ratio - 0.5``).
    ``box`` is (x0, y0, x1, y1) in the resized image (before the model's postprocess).
    """
    m = mask.shape[-1]
    (hr, wr), (ho, wo) = resized_hw, out_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)

    def axis(lo, size, ratio, n):
        # output pixels within one bin of the box; beyond it the sampled mask is zero
        first = max(0, math.floor((lo - size / m + 0.5) * ratio - 0.5))
        last = min(n - 1, math.ceil((lo + size + size / m + 0.5) * ratio - 0.5))
        idx = torch.arange(first, max(first, last + 1), dtype=torch.float32, device=mask.device)
        return first, max(first, last + 1), 2.0 * ((idx + 0.5) / ratio - 0.5 - lo) / size - 1.0

    out = torch.zeros(out_hw, dtype=torch.float32, device=mask.device)
    c0, c1, gx = axis(x0, bw, wo / wr, wo)
    r0, r1, gy = axis(y0, bh, ho / hr, ho)
    if c0 >= c1 or r0 >= r1:
        return out
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]  # (1, rows, cols, (x, y))
    out[r0:r1, c0:c1] = F.grid_sample(mask.float()[None, None], grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False)[0, 0]
    return out


@torch.no_grad()
def detect(model: MaskRCNN, image: torch.Tensor) -> dict:
    """Inference on one (3, H, W) image: boxes, scores and full-resolution mask probabilities.

    The same steps as ``MaskRCNN.forward`` in eval mode, except that masks are pasted by
    :func:`paste_mask` instead of torchvision's biased ``paste_masks_in_image``.
    """
    hw = tuple(image.shape[-2:])
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    det = model.roi_heads(features, proposals, images.image_sizes)[0][0]
    resized = images.image_sizes[0]
    masks = [paste_mask(mk[0], bx, resized, hw) for mk, bx in zip(det["masks"], det["boxes"])]
    scale = torch.tensor([hw[1] / resized[1], hw[0] / resized[0]] * 2, device=image.device)
    return {"boxes": det["boxes"] * scale, "scores": det["scores"],
            "masks": torch.stack(masks)[:, None] if masks else torch.zeros((0, 1, *hw), device=image.device)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(path: str | Path, model: nn.Module, *, half: bool = False, **meta) -> Path:
    """Write atomically (temp file + rename) so a reader never sees a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    if half:
        state = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in state.items())
    model = model.module if hasattr(model, "module") else model
    blob = {"format": CHECKPOINT_FORMAT, "config": asdict(model.fetalhc_config), "state_dict": state, **meta}
    if getattr(model, "fetalhc_refiner", None) is not None:  # the second stage travels with the first
        blob["refiner"] = model.fetalhc_refiner.to_blob(half=half)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a served model must be readable by the server
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/garbage files
        raise CheckpointError(f"{path} is not a readable model checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a FetalHC checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return blob


def stored_half(blob: dict) -> bool:
    """Whether a checkpoint stores its weights in float16 (a file made from it should too)."""
    return any(v.dtype == torch.float16 for v in blob["state_dict"].values() if v.is_floating_point())


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    for k in ("anchor_sizes",):
        d[k] = tuple(tuple(x) for x in d[k])
    for k in ("aspect_ratios", "mask_head_layers", "rpn_proposals"):
        d[k] = tuple(d[k])
    return ModelConfig(**d)


def load_model(path: str | Path, device: str | torch.device = "cpu",
               expect_config: str | None = None) -> tuple[MaskRCNN, dict]:
    """Load a checkpoint into a fresh model of the config it carries; returns (model in eval, meta)."""
    blob = read_checkpoint(path)
    cfg = config_from_dict(blob["config"])
    if expect_config and cfg.name != expect_config:
        raise CheckpointError(f"{path} holds a {cfg.name!r} model, not {expect_config!r}")
    model = build_model(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match config {cfg.name!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    attach_refiner(model, blob)
    meta = {k: v for k, v in blob.items() if k not in ("state_dict", "refiner")}
    meta["refiner_config"] = None if model.fetalhc_refiner is None else model.fetalhc_refiner.describe()
    meta["path"] = str(path)
    meta["version"] = model_version(path)
    return model, meta


def attach_refiner(model: MaskRCNN, blob: dict) -> None:
    """Give ``model`` the checkpoint's second stage (``model.fetalhc_refiner``; None when it has none)."""
    try:
        model.fetalhc_refiner = Refiner.from_blob(blob["refiner"]) if blob.get("refiner") else None
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"the checkpoint's outline refiner does not load: {exc}") from None


# Checkpoint entries that describe one file (its format, training state, where and what it is), not the
# model: a new file made from a loaded model (export, combine_stages) drops them and writes its own.
FILE_KEYS = ("format", "config", "path", "version", "optimizer", "scheduler")


def portable_meta(meta: dict, *also: str) -> dict:
    """``meta`` of :func:`load_model` without FILE_KEYS (and ``also``): what a new file of the model keeps."""
    return {k: v for k, v in meta.items() if k not in FILE_KEYS + also}


def combine_stages(stage1: str | Path, stage2_from: str | Path, out: str | Path, half: bool = False) -> Path:
    """A two-stage checkpoint: the first stage of ``stage1`` with the second stage of ``stage2_from``.

    The second stage learns from perturbed ground-truth ellipses, not from a first stage's output, so it
    carries over to another first stage; both provenances are kept, so the protocol still checks both.
    """
    model, meta = load_model(stage1)
    blob = read_checkpoint(stage2_from)
    if not blob.get("refiner"):
        raise CheckpointError(f"{stage2_from} has no second stage to take")
    attach_refiner(model, blob)
    keep = portable_meta(meta, "refiner_config", "refiner_data")
    return save_checkpoint(out, model, half=half, **keep, refiner_data=blob.get("refiner_data"))


def model_version(path: str | Path) -> str:
    """Short content hash: identifies exactly which weights produced a measurement."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{Path(path).stem}-{h.hexdigest()[:10]}"


def with_overrides(config: str | ModelConfig, **kw) -> ModelConfig:
    cfg = CONFIGS[config] if isinstance(config, str) else config
    return replace(cfg, **kw) if kw else cfg

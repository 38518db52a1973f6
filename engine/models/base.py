"""What a model family supplies (`Family`), and the interface every family's model has (`MultiwayModel`).

A family is declared once, in its own package under engine/models, and registered in engine/models/__init__.py:
its config and how it is inferred from a published checkpoint, its module tree (which also lists the published
tensors and converts them, engine.layers.checkpoint), its tokenizer, its task heads, and the few facts about its
inputs that tools need. Nothing outside a family's package and the registry asks which family it holds.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ..data.spm import SentencePieceTokenizer
from ..data.text import TextTokenizer
from ..layers.attention import AttentionOptions
from ..layers.linear import ParallelLinear, parallel_linears
from ..runtime.distributed import ParallelContext

Tokenizer = Union[TextTokenizer, SentencePieceTokenizer]
HEAD_ORDER = ("vqa", "nlvr2", "irtr")


class ModelConfigBase:
    """What the families' configs share: derived sizes, the task heads present, the manifest's dict form."""

    family: ClassVar[str]
    embed_dim: int
    depth: int
    num_heads: int
    ffn_dim: int  # a field or a property of each family's config
    image_size: int
    patch_size: int
    max_text_len: int
    vocab_size: int
    vqa_labels: Optional[int]
    nlvr2: bool
    retrieval: bool

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> int:
        """W: patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """n = W² + 1 (the CLS token)."""
        return self.grid ** 2 + 1

    @property
    def joint_tokens(self) -> int:
        """T + n: one sample's tokens in the joint pass, the shape the load-time kernel choices are timed at."""
        return self.max_text_len + self.num_image_tokens

    @property
    def tasks(self) -> Tuple[str, ...]:
        """Task heads present in the checkpoint, in a fixed order."""
        present = {"vqa": bool(self.vqa_labels), "nlvr2": self.nlvr2, "irtr": self.retrieval}
        return tuple(task for task in HEAD_ORDER if present[task])

    def to_dict(self) -> Dict[str, Any]:
        return {"family": self.family, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**data)


class MultiwayModel(nn.Module, metaclass=abc.ABCMeta):
    """One tensor-parallel rank's part of a model; what the task table (engine.models.tasks) calls.

    `text_masks` is 1 on real tokens for every family. The statistics it owns: `linear_kernels` (the CPU kernel
    chosen per linear shape, set at load), `attention_kernel` (the CPU attention kernel, set at load) and,
    through its group, the all-reduce time per purpose.
    """

    def __init__(self, cfg: ModelConfigBase, ctx: ParallelContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.attention_options = AttentionOptions()  # shared by every attention layer; set by the loader
        self.linear_kernels: Dict[str, str] = {}
        self.attention_kernel: Optional[str] = None
        self.compute_dtype = torch.float32  # of the matmuls and attention (set_compute_dtype)

    @abc.abstractmethod
    def vqa(self, text_ids: torch.Tensor, text_masks: torch.Tensor,
            image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(answer logits [B, labels], pooled feature [B, D])."""

    @abc.abstractmethod
    def nlvr2(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image_0: torch.Tensor,
              image_1: torch.Tensor) -> torch.Tensor:
        """[B, 2] logits for the sentence against the image pair."""

    @abc.abstractmethod
    def text_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of a text-only pass [B, D]."""

    @abc.abstractmethod
    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of an image-only pass [B, D]."""

    def compute_dtype_modules(self) -> List[nn.Module]:
        """Modules besides the parallel linears whose matmuls run in the compute dtype (patch embeddings...)."""
        return []

    @abc.abstractmethod
    def encoder_layers(self) -> Sequence[nn.Module]:
        """The transformer blocks, input first (int8 keeps the first in floating point)."""

    def smoothing_groups(self) -> List[Tuple[nn.Module, List[ParallelLinear]]]:
        """Each LayerNorm whose output only parallel linears read, with those linears: where int8 smoothing
        can fold its per-channel factors exactly (engine.layers.smoothing)."""
        return []

    def set_compute_dtype(self, dtype: torch.dtype) -> "MultiwayModel":
        """Put the matmul weights in `dtype`. The residual stream, every LayerNorm, the embeddings and the task
        heads keep fp32: in bf16 the residual adds lose the small per-layer updates, and the logits themselves
        round to steps of 1/64 near 2 — coarser than the top-2 margins of real VQA answers."""
        for module in list(parallel_linears(self)) + self.compute_dtype_modules():
            module.to(dtype)
        self.compute_dtype = dtype
        return self

    @property
    def has_position_bias(self) -> bool:
        """Whether attention adds a position bias to its scores (which kernel is faster depends on it)."""
        return False

    def cached_position_biases(self) -> List[torch.Tensor]:
        """Position-bias tensors built and kept so far (engine.bench counts their memory)."""
        return []


@dataclass(frozen=True)
class Head:
    """A task head as a family's checkpoints hold it: its weights (for messages) and a published checkpoint."""
    weights: str
    example: str


@dataclass(frozen=True)
class TextIds:
    """The token ids synthetic inputs need: first, last, padding, and the lowest ordinary id."""
    first: int
    last: int
    pad: int
    lowest: int


@dataclass(frozen=True)
class Family:
    name: str  # the manifest's "family"
    title: str  # for people: "VLMo"
    config: Type[ModelConfigBase]
    model: Type[MultiwayModel]
    recognises: Callable[[Mapping[str, torch.Tensor]], bool]  # whether a published state dict is this family's
    # (state dict, saved hyper-parameters, overrides by config field) -> config; ConfigError when it cannot tell
    infer_config: Callable[..., ModelConfigBase]
    # (config, --tokenizer, --vocab) -> the tokenizer its checkpoints were trained with
    tokenizer: Callable[[Any, Optional[Path], Optional[Path]], Tokenizer]
    heads: Mapping[str, Head]
    text_ids: TextIds
    # engine.forward's input files name the text mask as the published code does: "text_masks" (1 on tokens)
    # or "padding_mask" (1 on padding)
    text_mask_input: str
    # tensors published checkpoints hold inside modules the engine builds and that it does not use; any
    # other unused tensor there means the structure was misread (a layer with part of an expert) and is refused
    unused_tensors: Tuple[str, ...]
    # the config fields `python -m sharding` may override, by option
    overrides: Tuple[str, ...]
    example: ModelConfigBase  # a small config with every part, for documentation (the plan table)

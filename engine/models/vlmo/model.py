"""VLMo for inference, one tensor-parallel rank of it (DESIGN.md §3).

Modules are named as the published checkpoint's tensors, so the published names, full shapes and splits come
from this tree (engine.layers.checkpoint). At load, each block's published tensors are converted into what it
computes with: 1/√d folded into the q rows of `qkv`, `[q_bias/√d, 0, v_bias]` made its bias (one biased GEMM),
and the layer scales γ folded into `proj` and each expert's `fc2` (γ ⊙ (W x + b) = (γW) x + γb).
Attention heads and FFN columns are this rank's slice; everything else is replicated.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.attention import AttentionOptions, KeySelection, attention, select_keys
from ...layers.checkpoint import CheckpointModule, Tensors, default_convert, default_specs, parameter
from ...layers.common import dense, embedding, layer_norm, patch_embedding
from ...layers.linear import ColumnParallelLinear, ParallelLinear, RowParallelLinear, reduce_parts
from ...layers.split import Split, TensorSpec
from ...runtime.distributed import ParallelContext
from ..base import MultiwayModel
from .config import VLMoConfig
from .relpos import INDEX_BUILDERS

TEXT, IMAGE, JOINT = "text", "image", "joint"
EPS = 1e-6


class Mlp(nn.Module):
    """fc1 → exact GELU (column-parallel), fc2 (row-parallel: its all-reduce is the block's)."""

    def __init__(self, cfg: VLMoConfig, ctx: ParallelContext) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.embed_dim, cfg.ffn_dim, ctx, gelu=True)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.embed_dim, ctx)


class Attention(CheckpointModule):
    """Multi-head self-attention over this rank's heads; proj is row-parallel: one all-reduce."""

    def __init__(self, cfg: VLMoConfig, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        self.heads = cfg.num_heads // ctx.tp_size
        self.scale = cfg.head_dim ** -0.5
        self.options = options
        self.qkv = ColumnParallelLinear(cfg.embed_dim, 3 * cfg.embed_dim, ctx, groups=3)
        self.proj = RowParallelLinear(cfg.embed_dim, cfg.embed_dim, ctx)

    def checkpoint_specs(self, tp: int) -> Dict[str, TensorSpec]:
        # published: q_bias and v_bias (no k bias) beside a bias-free qkv
        D = self.proj.weight.shape[0]
        heads = TensorSpec((D,), Split(0, why="its heads"))
        specs = {"q_bias": heads, "v_bias": heads}
        specs.update({k: v for k, v in default_specs(self, tp).items() if k != "qkv.bias"})
        return specs

    def from_checkpoint(self, tensors: Tensors) -> Tensors:
        q_bias, v_bias = tensors["q_bias"].float(), tensors["v_bias"].float()
        weight = tensors["qkv.weight"].float().clone()
        weight[:len(q_bias)] *= self.scale
        return default_convert(self, {**tensors, "qkv.weight": weight,
                                      "qkv.bias": torch.cat((q_bias * self.scale, torch.zeros_like(q_bias), v_bias))})

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], keys: KeySelection) -> torch.Tensor:
        """This rank's heads' output, before proj: [B, N, heads·d]."""
        return attention(self.qkv(x), self.heads, bias, keys, self.options)


class Block(CheckpointModule):
    """Shared attention, then the modality expert FFN chosen by the route; two all-reduces whatever the route."""

    def __init__(self, cfg: VLMoConfig, layer: int, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.text_len = cfg.max_text_len
        self.layer_scale = cfg.layer_scale
        self.norm1 = layer_norm(D, EPS)
        self.attn = Attention(cfg, ctx, options)
        self.norm2_text, self.norm2_imag = layer_norm(D, EPS), layer_norm(D, EPS)
        self.mlp_text, self.mlp_imag = Mlp(cfg, ctx), Mlp(cfg, ctx)
        self.has_vl = cfg.has_vl_expert(layer)
        if self.has_vl:
            self.mlp_vl, self.norm2_vl = Mlp(cfg, ctx), layer_norm(D, EPS)

    def _experts(self) -> List[str]:
        return ["text", "imag"] + (["vl"] if self.has_vl else [])

    def checkpoint_specs(self, tp: int) -> Dict[str, TensorSpec]:
        D = self.norm1.weight.shape[0]
        gammas = {"gamma_1": TensorSpec((D,)), "gamma_2": TensorSpec((D,))} if self.layer_scale else {}
        return {**gammas, **default_specs(self, tp)}

    def from_checkpoint(self, tensors: Tensors) -> Tensors:
        out = default_convert(self, tensors)
        if self.layer_scale:
            outputs = ["attn.proj"] + [f"mlp_{e}.fc2" for e in self._experts()]
            for prefix, gamma in [(outputs[0], tensors["gamma_1"])] + [(p, tensors["gamma_2"]) for p in outputs[1:]]:
                gamma = gamma.float()
                out[f"{prefix}.weight"] = out[f"{prefix}.weight"].float() * gamma[:, None]
                out[f"{prefix}.bias"] = out[f"{prefix}.bias"].float() * gamma
        return out

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], keys: KeySelection, mode: str) -> torch.Tensor:
        x = x + reduce_parts([(self.attn(self.norm1(x), bias, keys), self.attn.proj)])
        if mode == TEXT:
            routes = [(x, self.norm2_text, self.mlp_text)]
        elif mode == IMAGE:
            routes = [(x, self.norm2_imag, self.mlp_imag)]
        elif self.has_vl:
            routes = [(x, self.norm2_vl, self.mlp_vl)]
        else:  # joint input, no VL expert here: text and image tokens to their own experts, one all-reduce
            routes = [(x[:, :self.text_len], self.norm2_text, self.mlp_text),
                      (x[:, self.text_len:], self.norm2_imag, self.mlp_imag)]
        # x is this block's own tensor (made above) and every expert has read its tokens: add in place
        return reduce_parts([(mlp.fc1(norm(part)), mlp.fc2) for part, norm, mlp in routes], into=x)


class MultiwayTransformer(nn.Module):
    def __init__(self, cfg: VLMoConfig, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.cls_token = parameter(1, 1, D)
        if cfg.abs_pos_embed:
            self.pos_embed = parameter(1, cfg.num_image_tokens, D)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = patch_embedding(D, cfg.patch_size)
        self.blocks = nn.ModuleList(Block(cfg, i, ctx, options) for i in range(cfg.depth))
        self.norm = layer_norm(D, EPS)


class TextEmbeddings(nn.Module):
    """BERT embeddings as VLMo uses them: no position embedding unless the model has absolute positions."""

    def __init__(self, cfg: VLMoConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.word_embeddings = embedding(cfg.vocab_size, D)
        self.position_embeddings = embedding(cfg.max_text_len, D)
        self.token_type_embeddings = embedding(2, D)
        self.LayerNorm = layer_norm(D, 1e-12)
        self.abs_pos = cfg.abs_pos_embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids).float() + self.token_type_embeddings.weight[0]
        if self.abs_pos:
            x = x + self.position_embeddings.weight[: ids.shape[1]]
        return self.LayerNorm(x)


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


def _classifier(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(dense(d_in, hidden), layer_norm(hidden, 1e-5), nn.GELU(), dense(hidden, d_out))


class ItcProjection(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = dense(dim, dim, bias=False)


class VLMo(MultiwayModel):
    """Registered in the published order (the model's own table first, then its submodules)."""

    def __init__(self, cfg: VLMoConfig, ctx: ParallelContext) -> None:
        super().__init__(cfg, ctx)
        D = cfg.embed_dim
        if cfg.relative_position_bias:  # columns are (layer, head): this rank keeps its heads of every layer
            heads = cfg.depth * cfg.num_heads // ctx.tp_size
            split = Split(1, cfg.depth, "its heads of every layer")
            self.relative_position_bias_table = parameter(cfg.rel_table_rows, heads, split=split)
        self.transformer = MultiwayTransformer(cfg, ctx, self.attention_options)
        self.text_embeddings = TextEmbeddings(cfg)
        self.token_type_embeddings = embedding(cfg.num_token_types, D)
        self.pooler = Pooler(D)
        if cfg.retrieval:
            self.itc_text_proj = ItcProjection(D)
            self.itc_image_proj = ItcProjection(D)
        if cfg.vqa_labels:
            self.vqa_classifier = _classifier(D, 2 * D, cfg.vqa_labels)
        if cfg.nlvr2:
            self.nlvr2_classifier = _classifier(2 * D, 2 * D, 2)
        # (mode, dtype, device) -> [L, h, N, N] relative-position bias, built once on first use
        self._position_bias: Dict[tuple, torch.Tensor] = {}

    def compute_dtype_modules(self) -> List[nn.Module]:
        return [self.transformer.patch_embed, self.text_embeddings.word_embeddings]

    def encoder_layers(self) -> Sequence[nn.Module]:
        return self.transformer.blocks

    def smoothing_groups(self) -> List[Tuple[nn.Module, List[ParallelLinear]]]:
        # qkv reads norm1, each expert's fc1 its norm2; proj (attention output) and fc2 (GELU's) read no norm
        groups: List[Tuple[nn.Module, List[ParallelLinear]]] = []
        for block in self.transformer.blocks:
            groups.append((block.norm1, [block.attn.qkv]))
            groups += [(getattr(block, f"norm2_{e}"), [getattr(block, f"mlp_{e}").fc1]) for e in block._experts()]
        return groups

    def set_compute_dtype(self, dtype: torch.dtype) -> "VLMo":
        super().set_compute_dtype(dtype)
        if self.cfg.relative_position_bias:
            self.relative_position_bias_table.data = self.relative_position_bias_table.data.to(dtype)
        return self

    # --- embeddings -------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embeddings(text_ids) + self.token_type_embeddings.weight[0]

    def embed_image(self, image: torch.Tensor, token_type: int = 1) -> torch.Tensor:
        tr = self.transformer
        proj = tr.patch_embed.proj
        patches = proj(image.to(proj.weight.dtype)).flatten(2).transpose(1, 2).to(tr.cls_token.dtype)
        x = torch.cat((tr.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
        if self.cfg.abs_pos_embed:
            x = x + tr.pos_embed
        return x + self.token_type_embeddings.weight[token_type]

    # --- encoder ----------------------------------------------------------------------------
    def position_bias(self, mode: str) -> Optional[torch.Tensor]:
        """[L, h, N, N] relative-position bias of this rank's heads for `mode`, or None.

        Keys are in attention order: rolled left by `key_shift(mode)` (image keys first in a joint pass).
        """
        if not self.cfg.relative_position_bias:
            return None
        table = self.relative_position_bias_table
        key = (mode, table.dtype, table.device)
        if key not in self._position_bias:
            index = INDEX_BUILDERS[mode](self.cfg).roll(-self.key_shift(mode), dims=1).to(table.device)
            # rows of table.t() are (layer, head): gathering along them yields [L·h, N, N] with no permute copy
            self._position_bias[key] = table.t().contiguous()[:, index].view(self.cfg.depth, -1, *index.shape)
        return self._position_bias[key]

    def key_shift(self, mode: str) -> int:
        """How far keys are rolled left for attention: a joint pass's text keys go last, so padding is a suffix."""
        return self.cfg.max_text_len if mode == JOINT else 0

    @property
    def has_position_bias(self) -> bool:
        return self.cfg.relative_position_bias

    def cached_position_biases(self) -> List[torch.Tensor]:
        return list(self._position_bias.values())

    def encode(self, x: torch.Tensor, mode: str, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run every block over x [B, N, D]; key_mask [B, N] is 1 for real tokens. Returns the final norm."""
        bias = self.position_bias(mode)
        keys = select_keys(key_mask, self.key_shift(mode), self.attention_options)
        for layer, block in enumerate(self.transformer.blocks):
            x = block(x, None if bias is None else bias[layer].unsqueeze(0), keys, mode)
        return self.transformer.norm(x)

    def joint(self, text: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor,
              token_type: int = 1) -> torch.Tensor:
        """Pooled feature of a text+image pass (the CLS of the text); `text` is the embedded text."""
        x = torch.cat((text, self.embed_image(image, token_type)), dim=1)
        image_mask = torch.ones(x.shape[0], x.shape[1] - text.shape[1], dtype=text_masks.dtype,
                                device=text_masks.device)
        return self.pooler(self.encode(x, JOINT, torch.cat((text_masks, image_mask), dim=1)))

    # --- task heads -------------------------------------------------------------------------
    def vqa(self, text_ids: torch.Tensor, text_masks: torch.Tensor,
            image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cls_feats = self.joint(self.embed_text(text_ids), text_masks, image)
        return self.vqa_classifier(cls_feats), cls_feats

    def nlvr2(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image_0: torch.Tensor,
              image_1: torch.Tensor) -> torch.Tensor:
        """Two joint passes (the second image with token type 2) over one text embedding."""
        text = self.embed_text(text_ids)
        pooled = torch.cat((self.joint(text, text_masks, image_0, 1), self.joint(text, text_masks, image_1, 2)), dim=-1)
        return self.nlvr2_classifier(pooled)

    def text_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(self.embed_text(text_ids), TEXT, text_masks)
        return F.normalize(self.itc_text_proj.fc(hidden[:, 0]), dim=-1)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(self.embed_image(image), IMAGE)
        return F.normalize(self.itc_image_proj.fc(hidden[:, 0]), dim=-1)

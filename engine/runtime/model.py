"""VLMo for inference, one tensor-parallel rank of it (DESIGN.md §3).

Parameter names are the published checkpoint's, so a rank's shard file loads
with a strict load_state_dict. Attention heads and FFN columns are this rank's
slice (h = H / tp heads); everything else is replicated.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KeySelection, attend, select_keys
from .collectives import TensorParallelComm
from .config import VLMoConfig
from .parallel import ColumnParallelLinear, RowParallelLinear
from .relpos import INDEX_BUILDERS

TEXT, IMAGE, JOINT = "text", "image", "joint"


def _embedding(num: int, dim: int) -> nn.Embedding:
    # No random init: the weights come from the shard, and normal_ on the meta device imports torch._dynamo
    # (1.1 s of a 2 s load).
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=eps)
    norm.requires_grad_(False)
    return norm


class Mlp(nn.Module):
    """fc1 → exact GELU → fc2, column- then row-parallel: one all-reduce."""

    def __init__(self, cfg: VLMoConfig, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        tp_size = comm.size if comm else 1
        self.fc1 = ColumnParallelLinear(cfg.embed_dim, cfg.ffn_dim // tp_size, gelu=True)
        self.fc2 = RowParallelLinear(cfg.ffn_dim // tp_size, cfg.embed_dim, comm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x.to(self.fc1.weight.dtype)))


class Attention(nn.Module):
    """Multi-head self-attention over this rank's heads; proj is row-parallel: one all-reduce."""

    def __init__(self, cfg: VLMoConfig, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        self.heads = cfg.num_heads // (comm.size if comm else 1)
        self.head_dim = cfg.head_dim
        local = self.heads * self.head_dim
        # The checkpoint has q_bias and v_bias and no k bias; fold_scales makes them qkv's one bias.
        self.qkv = ColumnParallelLinear(cfg.embed_dim, 3 * local, bias=False)
        self.q_bias = nn.Parameter(torch.empty(local), requires_grad=False)
        self.v_bias = nn.Parameter(torch.empty(local), requires_grad=False)
        self.proj = RowParallelLinear(local, cfg.embed_dim, comm)
        self.scale = self.head_dim ** -0.5  # 1 once fold_scales has moved it into the q weights
        self.per_head_bmm = False  # bf16 attention as per-head matmuls (engine.runtime.attention)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], keys: KeySelection) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x.to(self.qkv.weight.dtype))
        q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if keys.shift:  # the key order the position bias is stored in
            k, v = k.roll(-keys.shift, dims=2), v.roll(-keys.shift, dims=2)
        # softmax(q kᵀ / √d + B_l + key mask) v, the masked keys left out
        if keys.per_sample is None:
            out = attend(q, k, v, bias, self.scale, self.per_head_bmm)
        else:
            out = torch.cat([attend(q[b:b + 1], k[b:b + 1, :, kept], v[b:b + 1, :, kept],
                                    None if bias is None else bias[..., kept], self.scale, self.per_head_bmm)
                             for b, kept in enumerate(keys.per_sample)])
        return self.proj(out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim))


class Block(nn.Module):
    """Shared attention, then the modality expert FFN chosen by the route."""

    def __init__(self, cfg: VLMoConfig, layer: int, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.text_len = cfg.max_text_len
        self.norm1 = _layer_norm(D, 1e-6)
        self.attn = Attention(cfg, comm)
        self.norm2_text, self.mlp_text = _layer_norm(D, 1e-6), Mlp(cfg, comm)
        self.norm2_imag, self.mlp_imag = _layer_norm(D, 1e-6), Mlp(cfg, comm)
        self.has_vl = cfg.has_vl_expert(layer)
        if self.has_vl:
            self.norm2_vl, self.mlp_vl = _layer_norm(D, 1e-6), Mlp(cfg, comm)
        if cfg.layer_scale:
            self.gamma_1 = nn.Parameter(torch.empty(D), requires_grad=False)
            self.gamma_2 = nn.Parameter(torch.empty(D), requires_grad=False)
        else:
            self.gamma_1 = self.gamma_2 = None

    def _scaled(self, gamma: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        return y if gamma is None else y.mul_(gamma)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], keys: KeySelection, mode: str) -> torch.Tensor:
        x = x + self._scaled(self.gamma_1, self.attn(self.norm1(x), bias, keys))
        if mode == TEXT:
            x += self._scaled(self.gamma_2, self.mlp_text(self.norm2_text(x)))
        elif mode == IMAGE:
            x += self._scaled(self.gamma_2, self.mlp_imag(self.norm2_imag(x)))
        elif self.has_vl:
            x += self._scaled(self.gamma_2, self.mlp_vl(self.norm2_vl(x)))
        else:  # joint input, no VL expert here: text tokens and image tokens go to their own experts
            text, image = x[:, :self.text_len], x[:, self.text_len:]
            text += self._scaled(self.gamma_2, self.mlp_text(self.norm2_text(text)))
            image += self._scaled(self.gamma_2, self.mlp_imag(self.norm2_imag(image)))
        return x


def _scale_outputs(layer: RowParallelLinear, gamma: torch.Tensor) -> None:
    layer.weight.data *= gamma[:, None]
    layer.bias.data *= gamma


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VLMoConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.proj.requires_grad_(False)


class MultiwayTransformer(nn.Module):
    def __init__(self, cfg: VLMoConfig, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D), requires_grad=False)
        self.pos_embed = (nn.Parameter(torch.empty(1, cfg.num_image_tokens, D), requires_grad=False)
                          if cfg.abs_pos_embed else None)
        self.blocks = nn.ModuleList(Block(cfg, i, comm) for i in range(cfg.depth))
        self.norm = _layer_norm(D, 1e-6)


class TextEmbeddings(nn.Module):
    """BERT embeddings as VLMo uses them: no position embedding unless the model has absolute positions."""

    def __init__(self, cfg: VLMoConfig) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.word_embeddings = _embedding(cfg.vocab_size, D)
        self.position_embeddings = _embedding(cfg.max_text_len, D)
        self.token_type_embeddings = _embedding(2, D)
        self.LayerNorm = _layer_norm(D, 1e-12)
        self.requires_grad_(False)
        self.abs_pos = cfg.abs_pos_embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        if self.abs_pos:
            x = x + self.position_embeddings.weight[: ids.shape[1]]
        return self.LayerNorm(x)


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


def _classifier(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    head = nn.Sequential(nn.Linear(d_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_out))
    head.requires_grad_(False)
    return head


class ItcProjection(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)
        self.requires_grad_(False)


class VLMo(nn.Module):
    def __init__(self, cfg: VLMoConfig, comm: Optional[TensorParallelComm] = None) -> None:
        """One tensor-parallel rank's part of the model; `comm` is its group's all-reduce (None at tp 1)."""
        super().__init__()
        self.cfg = cfg
        tp_size = comm.size if comm else 1
        D = cfg.embed_dim
        self.transformer = MultiwayTransformer(cfg, comm)
        self.text_embeddings = TextEmbeddings(cfg)
        self.token_type_embeddings = _embedding(cfg.num_token_types, D)
        self.token_type_embeddings.requires_grad_(False)
        self.pooler = Pooler(D)
        if cfg.relative_position_bias:
            heads = cfg.depth * cfg.num_heads // tp_size
            self.relative_position_bias_table = nn.Parameter(torch.empty(cfg.rel_table_rows, heads),
                                                             requires_grad=False)
        if cfg.vqa_labels:
            self.vqa_classifier = _classifier(D, 2 * D, cfg.vqa_labels)
        if cfg.nlvr2:
            self.nlvr2_classifier = _classifier(2 * D, 2 * D, 2)
        if cfg.retrieval:
            self.itc_text_proj = ItcProjection(D)
            self.itc_image_proj = ItcProjection(D)
        # (mode, dtype, device) -> [L, h, N, N] relative-position bias, built once on first use
        self._position_bias: Dict[tuple, torch.Tensor] = {}

    def set_compute_dtype(self, dtype: torch.dtype) -> "VLMo":
        """Put the matmul weights (attention, experts, patch embedding, position table) in `dtype`.

        The residual stream, LayerNorms, layer scales and task heads keep the loaded precision (fp32): in bf16
        the residual adds lose the small per-layer updates, and the logits themselves round to steps of 1/64
        near 2 — coarser than the top-2 margins of real VQA answers.
        """
        for block in self.transformer.blocks:
            for name in ("attn", "mlp_text", "mlp_imag", "mlp_vl"):
                if hasattr(block, name):
                    getattr(block, name).to(dtype)
        self.transformer.patch_embed.to(dtype)
        self.text_embeddings.word_embeddings.to(dtype)
        if self.cfg.relative_position_bias:
            self.relative_position_bias_table.data = self.relative_position_bias_table.data.to(dtype)
        return self

    def fold_scales(self) -> "VLMo":
        """Fold 1/√d into the q rows of qkv and the layer scales into proj and each fc2: γ ⊙ (W x + b) = (γW) x + γb.

        Also makes [q_bias · 1/√d, 0, v_bias] qkv's bias, so that attention runs one biased GEMM.
        """
        for block in self.transformer.blocks:
            attn = block.attn
            q = slice(0, attn.heads * attn.head_dim)
            attn.qkv.weight.data[q] *= attn.scale
            qkv_bias = torch.cat((attn.q_bias * attn.scale, torch.zeros_like(attn.q_bias), attn.v_bias))
            attn.qkv.bias = nn.Parameter(qkv_bias, requires_grad=False)
            del attn.q_bias, attn.v_bias
            attn.scale = 1.0
            if block.gamma_1 is not None:
                _scale_outputs(attn.proj, block.gamma_1)
                for name in ("mlp_text", "mlp_imag", "mlp_vl"):
                    if hasattr(block, name):
                        _scale_outputs(getattr(block, name).fc2, block.gamma_2)
                block.gamma_1 = block.gamma_2 = None
        return self

    # --- embeddings -------------------------------------------------------------------------
    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        return self.text_embeddings(text_ids) + self.token_type_embeddings.weight[0]

    def embed_image(self, image: torch.Tensor, token_type: int = 1) -> torch.Tensor:
        tr = self.transformer
        patches = tr.patch_embed.proj(image.to(tr.patch_embed.proj.weight.dtype)).flatten(2).transpose(1, 2)
        patches = patches.to(tr.cls_token.dtype)
        x = torch.cat((tr.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
        if tr.pos_embed is not None:
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

    def cached_position_biases(self) -> List[torch.Tensor]:
        """The position biases built so far (engine.bench counts their memory)."""
        return list(self._position_bias.values())

    def encode(self, x: torch.Tensor, mode: str, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run every block over x [B, N, D]; key_mask [B, N] is 1 for real tokens. Returns the final norm."""
        bias = self.position_bias(mode)
        keys = select_keys(key_mask, self.key_shift(mode))
        for layer, block in enumerate(self.transformer.blocks):
            x = block(x, None if bias is None else bias[layer].unsqueeze(0), keys, mode)
        return self.transformer.norm(x)

    def joint(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor,
              token_type: int = 1) -> torch.Tensor:
        """Pooled feature of a text+image pass (the CLS of the text)."""
        x = torch.cat((self.embed_text(text_ids), self.embed_image(image, token_type)), dim=1)
        image_mask = torch.ones(x.shape[0], x.shape[1] - text_ids.shape[1], dtype=text_masks.dtype,
                                device=text_masks.device)
        hidden = self.encode(x, JOINT, torch.cat((text_masks, image_mask), dim=1))
        return self.pooler(hidden)

    # --- task heads -------------------------------------------------------------------------
    def vqa(self, text_ids: torch.Tensor, text_masks: torch.Tensor,
            image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(answer logits [B, labels], pooled feature [B, D])."""
        cls_feats = self.joint(text_ids, text_masks, image)
        return self.vqa_classifier(cls_feats), cls_feats

    def nlvr2(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image_0: torch.Tensor,
              image_1: torch.Tensor) -> torch.Tensor:
        """[B, 2] logits from the two joint passes (second image with token type 2)."""
        pooled = torch.cat((self.joint(text_ids, text_masks, image_0, 1),
                            self.joint(text_ids, text_masks, image_1, 2)), dim=-1)
        return self.nlvr2_classifier(pooled)

    def text_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of a text-only pass."""
        hidden = self.encode(self.embed_text(text_ids), TEXT, text_masks)
        return F.normalize(self.itc_text_proj.fc(hidden[:, 0]), dim=-1)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of an image-only pass."""
        hidden = self.encode(self.embed_image(image), IMAGE)
        return F.normalize(self.itc_image_proj.fc(hidden[:, 0]), dim=-1)

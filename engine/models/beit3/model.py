"""BEiT-3 for inference, one tensor-parallel rank of it (DESIGN.md §11; golden/README.md §BEiT-3).

torchscale's Multiway encoder as microsoft/unilm `beit3` fine-tunes it: every linear and LayerNorm of a layer
exists twice, `.A` for the image tokens and `.B` for the text tokens, a joint pass putting the image tokens
first. Pre-LN layers with Sub-LN: attention → `inner_attn_ln` over all heads → `out_proj`, and
`fc1` → GELU → `ffn_layernorm` → `fc2`. Learned absolute positions per modality, numbered from 2 (fairseq).

Modules are named as the published tensors; at load each expert's q, k and v are fused into one projection
with 1/√d folded into the q rows (SelfAttention.from_checkpoint). This rank holds its heads of q/k/v
(column-parallel) and the matching columns of `out_proj` (row-parallel), its chunk of `fc1`'s rows and `fc2`'s
columns, and its chunk of both Sub-LNs' weights, whose statistics are reduced across the ranks
(engine.layers.subln). Per layer: two activation all-reduces, each shared by both experts' tokens (the
multiway step, engine.layers.linear.reduce_parts), plus two small statistics all-reduces.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...layers.attention import AttentionOptions, KeySelection, attention, select_keys
from ...layers.checkpoint import CheckpointModule, Tensors, default_convert, default_specs, parameter
from ...layers.common import dense, embedding, layer_norm, patch_embedding
from ...layers.linear import ColumnParallelLinear, ParallelLinear, RowParallelLinear, reduce_parts
from ...layers.split import Split, TensorSpec
from ...layers.subln import SplitLayerNorm, split_layer_norm
from ...runtime.distributed import ParallelContext
from ..base import MultiwayModel
from .config import LAYERNORM_EPS, POSITION_OFFSET, BEiT3Config

IMAGE, TEXT = 0, 1  # expert A, expert B
Parts = List[Tuple[int, torch.Tensor]]  # (expert, its consecutive tokens [B, n, ...])


class Multiway(nn.Module):
    """Two experts of the same kind: A for image tokens, B for text tokens."""

    def __init__(self, make: Callable[[], nn.Module], make_b: Optional[Callable[[], nn.Module]] = None) -> None:
        super().__init__()
        self.A, self.B = make(), (make_b or make)()

    def __getitem__(self, expert: int) -> nn.Module:
        return self.B if expert == TEXT else self.A


def split_parts(x: torch.Tensor, split: int) -> Parts:
    """(expert, tokens) of x [B, N, ...] whose first `split` tokens are image tokens; empty parts left out."""
    return [(e, part) for e, part in ((IMAGE, x[:, :split]), (TEXT, x[:, split:])) if part.shape[1]]


def join(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts), dim=1)


def sub_layer_norm(norm_of: Callable[[int], SplitLayerNorm], parts: Parts, ctx: ParallelContext) -> Parts:
    """Each part's expert Sub-LN over the full (split) features, all parts' statistics in one all-reduce."""
    normed = split_layer_norm([(x, norm_of(e).weight, norm_of(e).bias) for e, x in parts], LAYERNORM_EPS,
                              ctx.tp_rank, ctx.tp_size, lambda t: ctx.all_reduce_(t, "subln"))
    return [(e, y) for (e, _), y in zip(parts, normed)]


class FeedForward(nn.Module):
    def __init__(self, cfg: BEiT3Config, ctx: ParallelContext) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.embed_dim, cfg.ffn_dim, ctx, gelu=True)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.embed_dim, ctx)
        self.ffn_layernorm = SplitLayerNorm(cfg.ffn_dim, ctx)


class SelfAttention(CheckpointModule):
    def __init__(self, cfg: BEiT3Config, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.ctx, self.options = ctx, options
        self.heads, self.scale = cfg.num_heads // ctx.tp_size, cfg.head_dim ** -0.5
        self.qkv = Multiway(lambda: ColumnParallelLinear(D, 3 * D, ctx, groups=3))
        self.out_proj = Multiway(lambda: RowParallelLinear(D, D, ctx))
        self.inner_attn_ln = Multiway(lambda: SplitLayerNorm(D, ctx))

    def checkpoint_specs(self, tp: int) -> Dict[str, TensorSpec]:
        # published: q_proj, k_proj and v_proj apart; this rank keeps its heads' rows of each
        D = self.out_proj.A.weight.shape[0]
        heads = Split(0, why="column-parallel: its heads")
        specs = {f"{proj}.{e}.{p}": TensorSpec((D, D) if p == "weight" else (D,), heads)
                 for proj in ("q_proj", "k_proj", "v_proj") for e in "AB" for p in ("weight", "bias")}
        specs.update({k: v for k, v in default_specs(self, tp).items() if not k.startswith("qkv.")})
        return specs

    def from_checkpoint(self, tensors: Tensors) -> Tensors:
        fused = dict(tensors)
        for e in "AB":
            for p in ("weight", "bias"):
                q, k, v = (tensors[f"{proj}.{e}.{p}"].float() for proj in ("q_proj", "k_proj", "v_proj"))
                fused[f"qkv.{e}.{p}"] = torch.cat((q * self.scale, k, v))
        return default_convert(self, fused)

    def forward(self, parts: Parts, keys: KeySelection) -> torch.Tensor:
        out = attention(join([self.qkv[e](x) for e, x in parts]), self.heads, None, keys, self.options)
        heads = list(zip([e for e, _ in parts], out.split([x.shape[1] for _, x in parts], dim=1)))
        normed = sub_layer_norm(self.inner_attn_ln.__getitem__, heads, self.ctx)
        return reduce_parts([(y, self.out_proj[e]) for e, y in normed])


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.ctx = ctx
        self.self_attn = SelfAttention(cfg, ctx, options)
        self.self_attn_layer_norm = Multiway(lambda: layer_norm(D, LAYERNORM_EPS))
        self.ffn = Multiway(lambda: FeedForward(cfg, ctx))
        self.final_layer_norm = Multiway(lambda: layer_norm(D, LAYERNORM_EPS))

    def forward(self, x: torch.Tensor, split: int, keys: KeySelection) -> torch.Tensor:
        parts = split_parts(x, split)
        x = x + self.self_attn([(e, self.self_attn_layer_norm[e](t)) for e, t in parts], keys)
        hidden = [(e, self.ffn[e].fc1(self.final_layer_norm[e](t))) for e, t in split_parts(x, split)]
        normed = sub_layer_norm(lambda e: self.ffn[e].ffn_layernorm, hidden, self.ctx)
        # x is this layer's own tensor (made above) and both experts have read their tokens: add in place
        return reduce_parts([(h, self.ffn[e].fc2) for e, h in normed], into=x)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cls_token = parameter(1, 1, cfg.embed_dim)
        self.proj = patch_embedding(cfg.embed_dim, cfg.patch_size)


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.embed_positions = Multiway(lambda: embedding(cfg.num_image_tokens + POSITION_OFFSET, D),
                                        lambda: embedding(cfg.text_positions, D))
        self.layers = nn.ModuleList(EncoderLayer(cfg, ctx, options) for _ in range(cfg.depth))
        if cfg.normalize_output:
            self.layer_norm = Multiway(lambda: layer_norm(D, LAYERNORM_EPS))


class Backbone(nn.Module):
    def __init__(self, cfg: BEiT3Config, ctx: ParallelContext, options: AttentionOptions) -> None:
        super().__init__()
        self.text_embed = embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg, ctx, options)


class Pooler(nn.Module):
    """LayerNorm, dense, tanh on the first token (the image CLS of a joint pass)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.dense = layer_norm(dim, LAYERNORM_EPS), dense(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(hidden[:, 0])))


class TwoLayerMLP(nn.Module):
    """The NLVR2 head: LayerNorm, dense, LayerNorm, GELU, dense."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.norm1, self.dense1 = layer_norm(d_in, LAYERNORM_EPS), dense(d_in, hidden)
        self.norm2, self.dense2 = layer_norm(hidden, LAYERNORM_EPS), dense(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x)))))


class BEiT3(MultiwayModel):
    def __init__(self, cfg: BEiT3Config, ctx: ParallelContext) -> None:
        super().__init__(cfg, ctx)
        D = cfg.embed_dim
        self.beit3 = Backbone(cfg, ctx, self.attention_options)
        if cfg.vqa_labels:
            self.pooler = Pooler(D)
            self.head = nn.Sequential(dense(D, 2 * D), layer_norm(2 * D, LAYERNORM_EPS), nn.GELU(),
                                      dense(2 * D, cfg.vqa_labels))
        elif cfg.nlvr2:
            self.head = TwoLayerMLP(4 * D, 2 * D, 2)
        if cfg.retrieval:
            self.vision_head = dense(D, D, bias=False)
            self.language_head = dense(D, D, bias=False)

    def compute_dtype_modules(self) -> List[nn.Module]:
        return [self.beit3.vision_embed.proj]

    def encoder_layers(self) -> Sequence[nn.Module]:
        return self.beit3.encoder.layers

    def smoothing_groups(self) -> List[Tuple[nn.Module, List[ParallelLinear]]]:
        # per expert: qkv reads self_attn_layer_norm, out_proj the Sub-LN inner_attn_ln, fc1 final_layer_norm,
        # fc2 the Sub-LN ffn_layernorm (a Sub-LN's chunk on this rank feeds this rank's columns only)
        groups: List[Tuple[nn.Module, List[ParallelLinear]]] = []
        for layer in self.beit3.encoder.layers:
            attn = layer.self_attn
            for e in (IMAGE, TEXT):
                ffn = layer.ffn[e]
                groups += [(layer.self_attn_layer_norm[e], [attn.qkv[e]]), (attn.inner_attn_ln[e], [attn.out_proj[e]]),
                           (layer.final_layer_norm[e], [ffn.fc1]), (ffn.ffn_layernorm, [ffn.fc2])]
        return groups

    # --- embeddings -------------------------------------------------------------------------
    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        vision = self.beit3.vision_embed
        patches = vision.proj(image.to(vision.proj.weight.dtype)).flatten(2).transpose(1, 2).float()
        x = torch.cat((vision.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
        positions = self.beit3.encoder.embed_positions.A.weight
        return x + positions[POSITION_OFFSET:POSITION_OFFSET + x.shape[1]]

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        positions = self.beit3.encoder.embed_positions.B.weight
        return self.beit3.text_embed(text_ids) + positions[POSITION_OFFSET:POSITION_OFFSET + text_ids.shape[1]]

    # --- encoder ----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, split: int, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every layer over x [B, N, D], whose first `split` tokens are image tokens; key_mask [B, N] is 1 for
        real tokens. Padded tokens are never attended to, so their own (unused) outputs need no zeroing."""
        keys = select_keys(key_mask, 0, self.attention_options)
        for layer in self.beit3.encoder.layers:
            x = layer(x, split, keys)
        if self.cfg.normalize_output:
            norm = self.beit3.encoder.layer_norm
            x = join([norm[e](t) for e, t in split_parts(x, split)])
        return x

    def joint(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Hidden states of an image+text pass (image tokens first) and the position of the first text token."""
        image_tokens = self.embed_image(image)
        x = torch.cat((image_tokens, self.embed_text(text_ids)), dim=1)
        split = image_tokens.shape[1]
        image_mask = torch.ones(x.shape[0], split, dtype=text_masks.dtype, device=text_masks.device)
        return self.encode(x, split, torch.cat((image_mask, text_masks), dim=1)), split

    # --- task heads -------------------------------------------------------------------------
    def vqa(self, text_ids: torch.Tensor, text_masks: torch.Tensor,
            image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.joint(text_ids, text_masks, image)
        pooled = self.pooler(hidden)
        return self.head(pooled), pooled

    def nlvr2(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image_0: torch.Tensor,
              image_1: torch.Tensor) -> torch.Tensor:
        """Both images' joint passes as one batch; per pass [image CLS, text CLS], side by side."""
        B = text_ids.shape[0]
        hidden, split = self.joint(text_ids.repeat(2, 1), text_masks.repeat(2, 1), torch.cat((image_0, image_1)))
        cls = torch.cat((hidden[:, 0], hidden[:, split]), dim=-1)
        return self.head(torch.cat((cls[:B], cls[B:]), dim=-1))

    def text_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(self.embed_text(text_ids), 0, text_masks)
        return F.normalize(self.language_head(hidden[:, 0]), dim=-1)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        x = self.embed_image(image)
        return F.normalize(self.vision_head(self.encode(x, x.shape[1])[:, 0]), dim=-1)

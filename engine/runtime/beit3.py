"""BEiT-3 for inference, one tensor-parallel rank of it (DESIGN.md §11; golden/README.md §BEiT-3).

torchscale's Multiway encoder as microsoft/unilm `beit3` fine-tunes it: every linear and LayerNorm of a layer
exists twice, `.A` for the image tokens and `.B` for the text tokens, a joint pass putting the image tokens
first. Pre-LN layers with Sub-LN: attention → `inner_attn_ln` over all heads → `out_proj`, and
`fc1` → GELU → `ffn_layernorm` → `fc2`. Learned absolute positions per modality, numbered from 2 (fairseq).

Parameter names are the published checkpoint's, so a rank's shard loads with a strict load_state_dict.
This rank holds its heads of q/k/v (column-parallel) and the matching columns of `out_proj` (row-parallel),
its chunk of `fc1`'s rows and `fc2`'s columns, and its chunk of both Sub-LNs' weights, whose statistics are
reduced across the ranks (engine.runtime.subln). Per layer: two activation all-reduces, as for VLMo, plus two
small statistics all-reduces; both experts' tokens share each of them.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .attention import KeySelection, attend, select_keys
from .beit3_config import LAYERNORM_EPS, POSITION_OFFSET, BEiT3Config
from .collectives import TensorParallelComm
from .kernels import linear
from .parallel import ColumnParallelLinear, RowParallelLinear
from .subln import split_layer_norm

EXPERTS = ("A", "B")  # image, text
Parts = List[Tuple[str, torch.Tensor]]


def _layer_norm(dim: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
    norm.requires_grad_(False)
    return norm


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Multiway(nn.Module):
    """Two experts of the same kind: A for image tokens, B for text tokens."""

    def __init__(self, make: Callable[[], nn.Module], make_b: Optional[Callable[[], nn.Module]] = None) -> None:
        super().__init__()
        self.A, self.B = make(), (make_b or make)()


class LocalNorm(nn.Module):
    """This rank's chunk of a Sub-LN's weight and bias; the statistics come from engine.runtime.subln."""

    def __init__(self, local_dim: int) -> None:
        super().__init__()
        self.weight, self.bias = _param(local_dim), _param(local_dim)


def experts(module: Multiway, attr: str = "") -> Dict[str, nn.Module]:
    """{"A": module.A(.attr), "B": module.B(.attr)}: the per-expert modules a step applies."""
    return {e: getattr(getattr(module, e), attr) if attr else getattr(module, e) for e in EXPERTS}


def split_parts(x: torch.Tensor, split: int) -> Parts:
    """(expert, tokens) of x [B, N, ...] whose first `split` tokens are image tokens; empty parts left out."""
    parts = [("A", x[:, :split]), ("B", x[:, split:])]
    return [(expert, part) for expert, part in parts if part.shape[1]]


def join(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.cat(list(outputs), dim=1)


def each_expert(modules: Dict[str, nn.Module], parts: Parts) -> Parts:
    return [(expert, modules[expert](part)) for expert, part in parts]


def column_parallel(layers: Dict[str, ColumnParallelLinear], parts: Parts) -> Parts:
    return [(e, layers[e](x.to(layers[e].weight.dtype))) for e, x in parts]


def row_parallel(layers: Dict[str, RowParallelLinear], parts: Parts, par: "Parallel") -> torch.Tensor:
    """Both experts' row-parallel partial products, summed over the ranks in one all-reduce, then each bias once."""
    out = join([linear(x.to(layers[e].weight.dtype), layers[e].weight) for e, x in parts])
    if par.comm is not None:
        par.comm.all_reduce_(out)
    start = 0
    for expert, x in parts:
        out[:, start:start + x.shape[1]] += layers[expert].bias
        start += x.shape[1]
    return out


class Parallel:
    """Where this rank sits in its tensor-parallel group, its all-reduce (None at tp 1), and the host time spent
    in the Sub-LN statistics all-reduces (part of the comm's own count; engine.bench reports it apart)."""

    def __init__(self, comm: Optional[TensorParallelComm]) -> None:
        self.comm = comm
        self.size = comm.size if comm else 1
        self.rank = dist.get_rank(comm.group) if comm else 0
        self.subln_seconds, self.subln_calls = 0.0, 0

    def _timed_all_reduce(self, tensor: torch.Tensor) -> None:
        start = time.perf_counter()
        self.comm.all_reduce_(tensor)
        self.subln_seconds += time.perf_counter() - start
        self.subln_calls += 1

    def sub_layer_norm(self, norms: Dict[str, nn.Module], parts: Parts) -> Parts:
        normed = split_layer_norm([(x, norms[e].weight, norms[e].bias) for e, x in parts],
                                  LAYERNORM_EPS, self.rank, self.size, self._timed_all_reduce)
        return [(expert, y) for (expert, _), y in zip(parts, normed)]


class FeedForward(nn.Module):
    def __init__(self, cfg: BEiT3Config, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        local = cfg.ffn_dim // (comm.size if comm else 1)
        self.fc1 = ColumnParallelLinear(cfg.embed_dim, local, gelu=True)
        self.fc2 = RowParallelLinear(local, cfg.embed_dim, comm)
        self.ffn_layernorm = LocalNorm(local)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BEiT3Config, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads // (comm.size if comm else 1), cfg.head_dim
        local = self.heads * self.head_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, Multiway(lambda: ColumnParallelLinear(cfg.embed_dim, local)))
        self.out_proj = Multiway(lambda: RowParallelLinear(local, cfg.embed_dim, comm))
        self.inner_attn_ln = Multiway(lambda: LocalNorm(local))
        self.qkv: Optional[Multiway] = None  # q, k, v fused (q pre-scaled) by BEiT3.fold_scales
        self.per_head_bmm = False  # bf16 attention as per-head matmuls (set by the loader, engine.runtime.attention)

    def fuse_qkv(self) -> None:
        """One [3·local, D] projection per expert instead of three, with 1/√d folded into the q rows."""
        scale = self.head_dim ** -0.5
        fused = Multiway(lambda: ColumnParallelLinear(1, 1))  # placeholders: the fused weights replace theirs
        for expert in EXPERTS:
            q, k, v = (getattr(getattr(self, name), expert) for name in ("q_proj", "k_proj", "v_proj"))
            layer = getattr(fused, expert)
            layer.weight = nn.Parameter(torch.cat((q.weight * scale, k.weight, v.weight)), requires_grad=False)
            layer.bias = nn.Parameter(torch.cat((q.bias * scale, k.bias, v.bias)), requires_grad=False)
        self.qkv = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, parts: Parts, keys: KeySelection, par: Parallel) -> torch.Tensor:
        qkv = join([y for _, y in column_parallel(experts(self.qkv), parts)])
        B, N, _ = qkv.shape
        q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if keys.per_sample is None:
            out = attend(q, k, v, None, 1.0, self.per_head_bmm)
        else:  # padded text keys left out; image keys come first, so a sample's real keys are a prefix
            out = torch.cat([attend(q[b:b + 1], k[b:b + 1, :, kept], v[b:b + 1, :, kept], None, 1.0,
                                    self.per_head_bmm) for b, kept in enumerate(keys.per_sample)])
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        heads = [(e, y) for (e, _), y in zip(parts, out.split([x.shape[1] for _, x in parts], dim=1))]
        return row_parallel(experts(self.out_proj), par.sub_layer_norm(experts(self.inner_attn_ln), heads), par)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.self_attn = SelfAttention(cfg, comm)
        self.self_attn_layer_norm = Multiway(lambda: _layer_norm(D))
        self.ffn = Multiway(lambda: FeedForward(cfg, comm))
        self.final_layer_norm = Multiway(lambda: _layer_norm(D))

    def forward(self, x: torch.Tensor, split: int, keys: KeySelection, par: Parallel) -> torch.Tensor:
        x = x + self.self_attn(each_expert(experts(self.self_attn_layer_norm), split_parts(x, split)), keys, par)
        hidden = column_parallel(experts(self.ffn, "fc1"),
                                 each_expert(experts(self.final_layer_norm), split_parts(x, split)))
        hidden = par.sub_layer_norm(experts(self.ffn, "ffn_layernorm"), hidden)
        return x + row_parallel(experts(self.ffn, "fc2"), hidden, par)


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.proj.requires_grad_(False)
        self.cls_token = _param(1, 1, cfg.embed_dim)


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.embed_positions = Multiway(lambda: _embedding(cfg.num_image_tokens + POSITION_OFFSET, D),
                                        lambda: _embedding(cfg.text_positions, D))
        self.layers = nn.ModuleList(EncoderLayer(cfg, comm) for _ in range(cfg.depth))
        self.layer_norm = Multiway(lambda: _layer_norm(D)) if cfg.normalize_output else None


class Backbone(nn.Module):
    def __init__(self, cfg: BEiT3Config, comm: Optional[TensorParallelComm]) -> None:
        super().__init__()
        self.text_embed = _embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg, comm)


def _embedding(num: int, dim: int) -> nn.Embedding:
    # No random init: the weights come from the shard (and normal_ on the meta device is slow to import).
    embedding = nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    embedding.requires_grad_(False)
    return embedding


def _linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    layer.requires_grad_(False)
    return layer


class Pooler(nn.Module):
    """LayerNorm, dense, tanh on the first token (the image CLS of a joint pass)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.dense = _layer_norm(dim), _linear(dim, dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(self.norm(hidden[:, 0])))


class TwoLayerMLP(nn.Module):
    """The NLVR2 head: LayerNorm, dense, LayerNorm, GELU, dense."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.norm1, self.dense1 = _layer_norm(d_in), _linear(d_in, hidden)
        self.norm2, self.dense2 = _layer_norm(hidden), _linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.norm2(self.dense1(self.norm1(x)))))


def _vqa_head(dim: int, labels: int) -> nn.Sequential:
    head = nn.Sequential(_linear(dim, 2 * dim), _layer_norm(2 * dim), nn.GELU(), _linear(2 * dim, labels))
    return head


class BEiT3(nn.Module):
    """The same task interface as engine.runtime.model.VLMo: `text_masks` is 1 on real tokens."""

    def __init__(self, cfg: BEiT3Config, comm: Optional[TensorParallelComm] = None) -> None:
        """One tensor-parallel rank's part of the model; `comm` is its group's all-reduce (None at tp 1)."""
        super().__init__()
        self.cfg = cfg
        self.par = Parallel(comm)
        self.tp_size = self.par.size
        D = cfg.embed_dim
        self.beit3 = Backbone(cfg, comm)
        if cfg.vqa_labels:
            self.pooler = Pooler(D)
            self.head = _vqa_head(D, cfg.vqa_labels)
        elif cfg.nlvr2:
            self.head = TwoLayerMLP(4 * D, 2 * D, 2)
        if cfg.retrieval:
            self.vision_head = _linear(D, D, bias=False)
            self.language_head = _linear(D, D, bias=False)

    def _layers(self) -> List[EncoderLayer]:
        return list(self.beit3.encoder.layers)

    def fold_scales(self) -> "BEiT3":
        """Fuse each expert's q, k, v into one projection with 1/√d folded into q: (sW)x + sb = s(Wx + b)."""
        for layer in self._layers():
            layer.self_attn.fuse_qkv()
        return self

    def set_compute_dtype(self, dtype: torch.dtype) -> "BEiT3":
        """Put the matmul weights (projections, FFNs, patch embedding) in `dtype`; the residual stream, every
        LayerNorm (Sub-LN statistics included), the embeddings and the task heads keep fp32, as for VLMo."""
        for layer in self._layers():
            for module in (layer.self_attn.qkv, layer.self_attn.out_proj):
                module.to(dtype)
            for expert in experts(layer.ffn).values():
                expert.fc1.to(dtype)
                expert.fc2.to(dtype)
        self.beit3.vision_embed.proj.to(dtype)
        return self

    def subln_allreduce(self) -> Tuple[float, int]:
        """Host seconds spent in the Sub-LN statistics all-reduces so far, and their number."""
        return self.par.subln_seconds, self.par.subln_calls

    def cached_position_biases(self) -> List[torch.Tensor]:
        return []  # no relative position bias (engine.bench asks)

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
        keys = select_keys(key_mask)
        for layer in self._layers():
            x = layer(x, split, keys, self.par)
        norm = self.beit3.encoder.layer_norm
        if norm is not None:
            x = join([y for _, y in each_expert(experts(norm), split_parts(x, split))])
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
        """(answer logits [B, labels], pooled feature [B, D])."""
        hidden, _ = self.joint(text_ids, text_masks, image)
        pooled = self.pooler(hidden)
        return self.head(pooled), pooled

    def nlvr2(self, text_ids: torch.Tensor, text_masks: torch.Tensor, image_0: torch.Tensor,
              image_1: torch.Tensor) -> torch.Tensor:
        """[B, 2] logits: both images' joint passes as one batch; per pass [image CLS, text CLS], side by side."""
        B = text_ids.shape[0]
        hidden, split = self.joint(text_ids.repeat(2, 1), text_masks.repeat(2, 1), torch.cat((image_0, image_1)))
        cls = torch.cat((hidden[:, 0], hidden[:, split]), dim=-1)
        return self.head(torch.cat((cls[:B], cls[B:]), dim=-1))

    def text_features(self, text_ids: torch.Tensor, text_masks: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of a text-only pass."""
        hidden = self.encode(self.embed_text(text_ids), 0, text_masks)
        return F.normalize(self.language_head(hidden[:, 0]), dim=-1)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised retrieval embedding of an image-only pass."""
        x = self.embed_image(image)
        return F.normalize(self.vision_head(self.encode(x, x.shape[1])[:, 0]), dim=-1)

"""OnePromptNet: a compact network of One-Prompt's design (Wu & Xu, CVPR 2024), in one file.

A query image is segmented from 1..K template images, each carrying its own prompt of any of the four One-Prompt
kinds (click, box, doodle, mask).  The pieces, and why they are here:

* one **encoder** shared by query and templates (residual 3x3 convs, GroupNorm, GELU) at four scales S..S/8;
* a light **prompt embedding**: the four prompt maps (positive, negative, box fill, mask) pooled to each scale and
  projected onto the template features, plus a learned embedding of the prompt kind;
* the **Prompt-Parser** at S/8: prompting step (an MLP mixes every template token with the foreground/background
  prototypes p1/p2 of its prompt; the mixed tokens against the query give an affinity mask M) and masking step (a conv
  maps M to the mean and log-variance of a Gaussian; query features are multiplied by it and the element-wise max with
  the unmasked features is kept);
* **One-Prompt-Former** blocks at S/8: self-attention over the query tokens, cross-attention from the query to the
  parsed tokens of all templates, an MLP;
* a second Parser **read-out at S/4**: attention from query positions to template positions whose values are the
  template's prompt maps, i.e. where the prompt "lands" on the query.  This carries propagation between neighbouring
  slices at a resolution where boundaries still exist;
* a U-shaped **decoder** with the query's skips, a logit head and a **quality head** (predicted Dice of the mask).

Template == query is the interactive (single-image) mode.  Nothing here knows about volumes: see ``engine``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Prompt-map channels, in order.  ``prompts.render_prompt_maps`` draws them.
PROMPT_CHANNELS = ("positive", "negative", "box", "mask")
#: Prompt kinds, in the order of the kind embedding.
PROMPT_KINDS = ("click", "box", "doodle", "mask")


@dataclass
class ModelConfig:
    """Architecture hyper-parameters; stored in every checkpoint and in ``weights_manifest.json``."""

    size: int = 96
    channels: List[int] = field(default_factory=lambda: [16, 32, 48, 96])
    dim: int = 96
    heads: int = 4
    blocks: int = 2
    readout_dim: int = 48

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _groups(c: int) -> int:
    for g in (8, 4, 2):
        if c % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and GELU and a residual connection."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.n1 = nn.GroupNorm(_groups(cout), cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.n2 = nn.GroupNorm(_groups(cout), cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.n1(self.c1(x)))
        h = self.n2(self.c2(h))
        return F.gelu(h + self.skip(x))


class Encoder(nn.Module):
    """Shared image encoder: returns features at S, S/2, S/4, S/8."""

    def __init__(self, channels: List[int]):
        super().__init__()
        self.stem = ResBlock(1, channels[0])
        self.downs = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.downs.append(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False),
                                            nn.GroupNorm(_groups(b), b), nn.GELU(), ResBlock(b, b)))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = [self.stem(x)]
        for d in self.downs:
            feats.append(d(feats[-1]))
        return feats


def sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed 2D sine-cosine positional encoding, (h*w, dim): the same position in query and template matches."""
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / max(q, 1)))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    ys = ys.reshape(-1, 1) * omega * (16.0 / h)
    xs = xs.reshape(-1, 1) * omega * (16.0 / w)
    pe = torch.cat([ys.sin(), ys.cos(), xs.sin(), xs.cos()], dim=1)
    if pe.shape[1] < dim:
        pe = F.pad(pe, (0, dim - pe.shape[1]))
    return pe.to(dtype)


class PromptParser(nn.Module):
    """One-Prompt's Prompt-Parser: prompting step (stacked MLP -> affinity mask) and Gaussian masking step."""

    def __init__(self, dim: int):
        super().__init__()
        self.mix = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.null_fg = nn.Parameter(torch.zeros(dim))
        self.null_bg = nn.Parameter(torch.zeros(dim))
        self.q_proj = nn.Linear(dim, dim)
        self.gauss = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, q: torch.Tensor, t: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, kind: torch.Tensor,
                valid: Optional[torch.Tensor], hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B,N,d) query tokens; t (B,K,N,d) template tokens; fg/bg (B,K,N) prompt weights; kind (B,K,d);
        valid (B,K) bool, or None when every template is real.

        Returns the masked query tokens, the parsed template tokens (B,K*N,d) and the affinity mask M (B,1,h,w).
        """
        B, K, N, d = t.shape

        def proto(w: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
            s = w.sum(-1, keepdim=True)
            p = (t * w.unsqueeze(-1)).sum(2) / s.clamp_min(1e-3)
            return torch.where(s > 1e-3, p, null.expand_as(p))

        p1 = proto(fg, self.null_fg) + kind
        p2 = proto(bg, self.null_bg) + kind
        h = self.mix(torch.cat([t, p1.unsqueeze(2).expand_as(t), p2.unsqueeze(2).expand_as(t)], -1)) + t
        hk = h.reshape(B, K * N, d)
        # Affinity: each query token reads the foreground weight of the template tokens it resembles.
        logits = torch.einsum("bnd,bmd->bnm", self.q_proj(q) / math.sqrt(d), hk)
        if valid is not None:
            logits = logits.masked_fill((~valid).repeat_interleave(N, dim=1).unsqueeze(1), float("-inf"))
        att = logits.softmax(-1)
        m = torch.einsum("bnm,bm->bn", att, fg.reshape(B, K * N).to(att.dtype))
        M = m.reshape(B, 1, *hw)
        # Masking step: a conv turns M into the mean and variance of a Gaussian over feature space.
        mu, logvar = self.gauss(torch.cat([M, M * M], 1)).chunk(2, 1)
        g = torch.exp(-((M - mu) ** 2) / (2 * torch.exp(logvar).clamp_min(1e-3)))
        g = g.flatten(2).transpose(1, 2)  # (B,N,1)
        q = torch.maximum(q * g, q)
        return q, hk, M


class FormerBlock(nn.Module):
    """One-Prompt-Former block (query branch): self-attention, cross-attention to parsed templates, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.n1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.n2(q)
        q = q + self.cross_attn(h, kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return q + self.mlp(self.n3(q))


class ReadOut(nn.Module):
    """Attention read-out at S/4: values are the templates' prompt maps, so the prompt is carried to the query."""

    def __init__(self, cq: int, dim: int, nvals: int):
        super().__init__()
        self.q = nn.Conv2d(cq, dim, 1)
        self.k = nn.Conv2d(cq, dim, 1)
        self.dim = dim
        self.nvals = nvals

    def forward(self, fq: torch.Tensor, ft: torch.Tensor, vals: torch.Tensor, valid: Optional[torch.Tensor]
                ) -> torch.Tensor:
        """fq (B,C,h,w); ft (B,K,C,h,w); vals (B,K,V,h,w); valid (B,K) bool or None (all real).

        Returns (B,V+1,h,w): the read values and the largest attention logit (how well the query matched at all).
        """
        B, K, C, h, w = ft.shape
        pe = sincos_2d(h, w, self.dim, fq.device, fq.dtype)
        q = (self.q(fq).flatten(2).transpose(1, 2) + pe) / math.sqrt(self.dim)  # (B,N,d)
        k = self.k(ft.reshape(B * K, C, h, w)).flatten(2).transpose(1, 2) + pe  # (BK,N,d)
        k = k.reshape(B, K * h * w, self.dim)
        v = vals.permute(0, 1, 3, 4, 2).reshape(B, K * h * w, -1)
        logits = torch.bmm(q, k.transpose(1, 2))  # (B,N,K*N): the largest tensor of the model
        if valid is not None:
            logits = logits.masked_fill((~valid).repeat_interleave(h * w, dim=1).unsqueeze(1), float("-inf"))
        top = logits.amax(-1, keepdim=True)
        # Softmax written out, so that its normaliser comes from the same matrix product as the values (a column of
        # ones) and, without autograd, the exponentials overwrite the logits: this matrix is most of the model's
        # memory traffic on a CPU (about a third less time per step than softmax + einsum + max).
        att = logits.sub_(top).exp_() if not torch.is_grad_enabled() else (logits - top).exp()
        v1 = torch.cat([v.to(att.dtype), torch.ones_like(v[..., :1], dtype=att.dtype)], -1)
        rs = torch.bmm(att, v1)
        r = rs[..., :-1] / rs[..., -1:]
        return torch.cat([r, top / math.sqrt(self.dim)], -1).transpose(1, 2).reshape(B, -1, h, w)


class OnePromptNet(nn.Module):
    """Segments a query image from K prompted templates.  See the module docstring for the design."""

    def __init__(self, config: Optional[ModelConfig] = None):
        super().__init__()
        self.config = cfg = config or ModelConfig()
        c = cfg.channels
        d = cfg.dim
        self.encoder = Encoder(c)
        nprompt = len(PROMPT_CHANNELS)
        # Only the two coarse scales read template features, so only they get the prompt embedding.
        self.prompt_proj = nn.ModuleDict({str(lvl): nn.Conv2d(nprompt, c[lvl], 1) for lvl in (2, 3)})
        self.kind_emb = nn.Embedding(len(PROMPT_KINDS), d)
        self.tok_q = nn.Linear(c[3], d)
        self.tok_t = nn.Linear(c[3], d)
        self.parser = PromptParser(d)
        self.blocks = nn.ModuleList([FormerBlock(d, cfg.heads) for _ in range(cfg.blocks)])
        self.readout = ReadOut(c[2], cfg.readout_dim, nprompt + 1)
        self.up3 = nn.Conv2d(d + 1, c[2], 1)
        self.dec2 = ResBlock(c[2] * 2 + nprompt + 1, c[2])
        self.dec1 = ResBlock(c[2] + c[1], c[1])
        self.dec0 = ResBlock(c[1] + c[0], c[0])
        self.head = nn.Conv2d(c[0], 1, 1)
        self.quality = nn.Sequential(nn.Linear(d + 2, 64), nn.GELU(), nn.Linear(64, 1))

    @staticmethod
    def _fg_bg(pm: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Foreground / background weights from prompt maps (...,4,h,w) -> two (...,h,w) maps."""
        pos, neg, box, mask = pm.unbind(-3)
        fg = torch.clamp(pos + mask + box * (mask.flatten(-2).amax(-1)[..., None, None] <= 0), 0, 1)
        region = torch.clamp(box + mask, 0, 1)
        has_region = (region.flatten(-2).amax(-1) > 0)[..., None, None].to(pm.dtype)
        bg = torch.clamp(neg + (1 - region) * has_region, 0, 1)
        return fg, bg

    def encode(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Encoder features of (B,1,S,S) images.  Only levels 2 and 3 of a template's features are ever read."""
        return self.encoder(images)

    def forward(self, query: torch.Tensor, templates: torch.Tensor, prompts: torch.Tensor, kinds: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """query (B,1,S,S); templates (B,K,1,S,S); prompts (B,K,4,S,S) in [0,1]; kinds (B,K) int64; valid (B,K) bool.

        Returns logits (B,1,S,S) and predicted quality (B,) in [0,1].
        """
        B, K = templates.shape[:2]
        S = query.shape[-1]
        feats = self.encoder(torch.cat([query, templates.reshape(B * K, 1, S, S)], 0))
        return self.decode([f[:B] for f in feats], [f[B:] for f in feats], prompts, kinds, valid)

    def decode(self, fq: List[torch.Tensor], ft: List[torch.Tensor], prompts: torch.Tensor, kinds: torch.Tensor,
               valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Everything after the encoder: ``fq`` query features (B,...), ``ft`` template features (B*K,...).

        Split from ``forward`` so that callers can cache encoder features of slices they see more than once
        (propagation: a slice is the query of one step and a template of the next ones).  ``valid`` None means every
        template is real: the attention masks for padding templates are then skipped.
        """
        B, K = prompts.shape[:2]
        S = prompts.shape[-1]
        ft = list(ft)
        query = fq[0]
        pm = prompts.reshape(B * K, -1, S, S)
        # Prompt embedding added to the template features at the two coarse scales used below.
        for lvl in (2, 3):
            f = ft[lvl]
            ft[lvl] = f + self.prompt_proj[str(lvl)](F.adaptive_avg_pool2d(pm, f.shape[-2:]))
        # Parser + Former at S/8.
        f3q, f3t = fq[3], ft[3]
        h, w = f3q.shape[-2:]
        pe = sincos_2d(h, w, self.config.dim, query.device, query.dtype)
        q = self.tok_q(f3q.flatten(2).transpose(1, 2)) + pe
        t = self.tok_t(f3t.flatten(2).transpose(1, 2)) + pe
        t = t.reshape(B, K, h * w, -1)
        pm3 = F.adaptive_avg_pool2d(pm, (h, w)).reshape(B, K, -1, h, w)
        fg, bg = self._fg_bg(pm3)
        kind = self.kind_emb(kinds)
        t = t + kind.unsqueeze(2)
        q, kv, M = self.parser(q, t, fg.flatten(2), bg.flatten(2), kind, valid, (h, w))
        kv_pad = None if valid is None else (~valid).repeat_interleave(h * w, dim=1)
        for blk in self.blocks:
            q = blk(q, kv, kv_pad)
        x3 = q.transpose(1, 2).reshape(B, -1, h, w)
        # Read-out at S/4.
        f2q = fq[2]
        h2, w2 = f2q.shape[-2:]
        vals = F.adaptive_avg_pool2d(pm, (h2, w2)).reshape(B, K, -1, h2, w2)
        ro = self.readout(f2q, ft[2].reshape(B, K, -1, h2, w2), vals, valid)
        x = F.interpolate(self.up3(torch.cat([x3, M], 1)), size=(h2, w2), mode="bilinear", align_corners=False)
        x = self.dec2(torch.cat([x, f2q, ro], 1))
        x = F.interpolate(x, size=fq[1].shape[-2:], mode="bilinear", align_corners=False)
        x = self.dec1(torch.cat([x, fq[1]], 1))
        x = F.interpolate(x, size=fq[0].shape[-2:], mode="bilinear", align_corners=False)
        x = self.dec0(torch.cat([x, fq[0]], 1))
        logits = self.head(x)
        qual_in = torch.cat([q.mean(1), M.flatten(1).mean(1, keepdim=True), M.flatten(1).amax(1, keepdim=True)], 1)
        quality = torch.sigmoid(self.quality(qual_in)).squeeze(1)
        return logits, quality


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""The Llama-style causal language model and its training loss.

Owns the network architecture (RMSNorm, rotary attention, SwiGLU MLP), its weight initialisation and
``causal_lm_loss``. Named sizes and seeded construction live in ``sizes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

INIT_STD = 0.02
Device = torch.device | str | None


@dataclass(frozen=True)
class ModelDims:
    """Every number needed to build a ``LlamaLM``; two equal dims give interchangeable state dicts."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    rope_theta: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelDims.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    """Root-mean-square norm; the statistic is taken in fp32 so bf16 activations do not underflow."""

    def __init__(self, dim: int, eps: float = 1e-6, device: Device = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_tables(dims: ModelDims, device: Device = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim // 2], always in fp32."""
    half = dims.head_dim // 2
    inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    positions = torch.arange(dims.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head by position; x is [B, H, T, head_dim]."""
    # Rotating in fp32 keeps positions distinguishable at long context when x is bf16.
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, dims: ModelDims, device: Device = None) -> None:
        super().__init__()
        self.n_heads = dims.n_heads
        self.head_dim = dims.head_dim
        # One fused projection: a single matmul is faster than three on every backend.
        self.wqkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=False, device=device)
        self.wo = nn.Linear(dims.d_model, dims.d_model, bias=False, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        qkv = self.wqkv(x).view(batch, seq, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, d_model))


class SwiGLU(nn.Module):
    def __init__(self, dims: ModelDims, device: Device = None) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(dims.d_model, 2 * dims.d_ff, bias=False, device=device)
        self.w_down = nn.Linear(dims.d_ff, dims.d_model, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dims: ModelDims, device: Device = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dims.d_model, device=device)
        self.attn = Attention(dims, device=device)
        self.mlp_norm = RMSNorm(dims.d_model, device=device)
        self.mlp = SwiGLU(dims, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def output_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The layers that write into the residual stream, whose init is shrunk with depth."""
        return self.attn.wo, self.mlp.w_down


class LlamaLM(nn.Module):
    """Decoder-only transformer: tokens [B, T] -> logits [B, T, vocab_size].

    With ``tie_embeddings`` there is no separate head parameter: the head reuses the embedding
    matrix, so the state dict holds no shared tensors (safetensors refuses those).
    Built on the meta device, it stays uninitialised until ``to_empty`` and ``reset_parameters``.
    """

    def __init__(
        self,
        dims: ModelDims,
        *,
        activation_checkpointing: bool = False,
        device: Device = None,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(dims.vocab_size, dims.d_model, device=device)
        self.blocks = nn.ModuleList(Block(dims, device=device) for _ in range(dims.n_layers))
        self.final_norm = RMSNorm(dims.d_model, device=device)
        self.lm_head: nn.Linear | None = None
        if not dims.tie_embeddings:
            self.lm_head = nn.Linear(dims.d_model, dims.vocab_size, bias=False, device=device)
        # Non-persistent: derived from dims, so checkpoints and averaged state stay parameters only.
        cos, sin = rotary_tables(dims, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.embed.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every parameter and the rotary tables; deterministic given ``generator``."""
        residual_std = INIT_STD / math.sqrt(2 * self.dims.n_layers)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD, generator=generator)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Each block adds two outputs to the residual stream; shrinking them keeps its variance
        # roughly independent of depth at init.
        for block in self.blocks:
            for proj in block.output_projections():
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std, generator=generator)
        # to_empty() leaves these buffers as garbage, so they are recomputed here too.
        cos, sin = rotary_tables(self.dims, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq_len = tokens.shape[1]
        if seq_len > self.dims.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {self.dims.max_seq_len}")
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        x = self.embed(tokens)
        use_checkpoint = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, cos, sin, use_reentrant=False) if use_checkpoint else block(x, cos, sin)
        x = self.final_norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` [B, T+1]: predict batch[:, 1:] from batch[:, :-1]."""
    batch = batch.long()
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    # fp32 softmax: bf16 log-probabilities lose the small differences that training relies on.
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

"""Pieces shared by the independent PyTorch references of tools/qwen_reference.py and
tools/chatglm_reference.py: RMSNorm and the left-padded causal batch (positions and attention bias)."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def positions(mask):
    """mask [B, T] (0 on left padding) -> float positions [B, T], counted from each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0).float()


def causal_bias(mask):
    """mask [B, T] -> additive attention bias [B, 1, T, T]: causal, no padding key visible. A padding query
    sees only itself, so its (unused) row stays finite."""
    T = mask.shape[1]
    real = mask.bool()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & real[:, None, None, :]
    allowed = allowed | (~real[:, None, :, None] & torch.eye(T, dtype=torch.bool))
    return torch.zeros(allowed.shape).masked_fill(~allowed, float('-inf'))

"""An independent PyTorch reference of Qwen 1 (model_type 'qwen', QWenLMHeadModel), written from the math
of the published modeling_qwen.py for tools/make_zoo_rotary_fixtures.py. Its parameter names are the
published checkpoints' (transformer.wte, transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1,
mlp.w2, mlp.c_proj}, transformer.ln_f, lm_head) and it reads the published config.json keys.

What the block computes:
  h = x + c_proj(attention(rope(q), rope(k), v))   with q, k, v = split(c_attn(ln_1(x))) into equal thirds
  y = h + mlp.c_proj(w1(z) * silu(w2(z)))          with z = ln_2(h); w1, w2 are intermediate_size / 2 wide
RMSNorm with layer_norm_epsilon; rotary embeddings rotate halves (pairs (k, k + r/2)) of the first
r = kv_channels * rotary_pct dims of each head, inv_freq = rotary_emb_base^(-2k/r). c_attn always has a
bias, the other linears only when no_bias is false. use_dynamic_ntk and use_logn_attn change nothing at
positions below seq_length, which is all this reference (and the fixtures) cover: it refuses longer input.
"""
import torch
from torch import nn

from zoo_reference_common import RMSNorm, causal_bias, positions


def rotate_halves(x, cos, sin):
    """x [B, H, T, D]; cos/sin [B, 1, T, r/2]: rotates pairs (k, k + r/2) of the first r dims."""
    half = cos.shape[-1]
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.head_dim = cfg['num_attention_heads'], cfg['kv_channels']
        width = self.heads * self.head_dim
        self.c_attn = nn.Linear(cfg['hidden_size'], 3 * width, bias=True)
        self.c_proj = nn.Linear(width, cfg['hidden_size'], bias=not cfg['no_bias'])

    def forward(self, x, cos, sin, bias):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = rotate_halves(q, cos, sin), rotate_halves(k, cos, sin)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias
        out = scores.softmax(-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        width, bias = cfg['intermediate_size'] // 2, not cfg['no_bias']
        self.w1 = nn.Linear(cfg['hidden_size'], width, bias=bias)
        self.w2 = nn.Linear(cfg['hidden_size'], width, bias=bias)
        self.c_proj = nn.Linear(width, cfg['hidden_size'], bias=bias)

    def forward(self, x):
        return self.c_proj(self.w1(x) * nn.functional.silu(self.w2(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        eps = cfg['layer_norm_epsilon']
        self.ln_1, self.attn = RMSNorm(cfg['hidden_size'], eps), Attention(cfg)
        self.ln_2, self.mlp = RMSNorm(cfg['hidden_size'], eps), MLP(cfg)

    def forward(self, x, cos, sin, bias):
        x = x + self.attn(self.ln_1(x), cos, sin, bias)
        return x + self.mlp(self.ln_2(x))


class QwenLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        h = cfg['hidden_size']
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg['vocab_size'], h),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg['num_hidden_layers'])),
            ln_f=RMSNorm(h, cfg['layer_norm_epsilon'])))
        self.lm_head = nn.Linear(h, cfg['vocab_size'], bias=False)
        rotary = int(cfg['kv_channels'] * cfg['rotary_pct'])
        self.inv_freq = 1.0 / cfg['rotary_emb_base'] ** (torch.arange(0, rotary, 2, dtype=torch.float) / rotary)

    def forward(self, ids, mask):
        """ids, mask [B, T] (mask 0 on left padding) -> logits [B, T, vocab]; positions count from each
        row's first real token, and no query sees a padding key."""
        assert ids.shape[1] <= self.cfg['seq_length'], 'beyond seq_length Qwen switches on NTK / logn scaling'
        angles = positions(mask)[:, None, :, None] * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        bias = causal_bias(mask)
        x = self.transformer.wte(ids)
        for block in self.transformer.h:
            x = block(x, cos, sin, bias)
        return self.lm_head(self.transformer.ln_f(x))


def config(hidden_size, intermediate_size, num_layers, heads, vocab_size, seq_length, **extra):
    """A config.json as Qwen 1's published checkpoints write it (Qwen-7B's keys)."""
    cfg = dict(
        architectures=['QWenLMHeadModel'], model_type='qwen',
        auto_map={'AutoConfig': 'configuration_qwen.QWenConfig',
                  'AutoModelForCausalLM': 'modeling_qwen.QWenLMHeadModel'},
        attn_dropout_prob=0.0, bf16=False, emb_dropout_prob=0.0, fp16=False, fp32=False,
        hidden_size=hidden_size, initializer_range=0.02, intermediate_size=intermediate_size,
        kv_channels=hidden_size // heads, layer_norm_epsilon=1e-6, max_position_embeddings=seq_length,
        no_bias=True, num_attention_heads=heads, num_hidden_layers=num_layers, onnx_safe=None,
        rotary_emb_base=10000, rotary_pct=1.0, scale_attn_weights=True, seq_length=seq_length,
        softmax_in_fp32=False, tie_word_embeddings=False, tokenizer_class='QWenTokenizer',
        use_cache=True, use_cache_kernel=False, use_cache_quantization=False, use_dynamic_ntk=True,
        use_flash_attn='auto', use_logn_attn=True, vocab_size=vocab_size)
    cfg.update(extra)
    return cfg

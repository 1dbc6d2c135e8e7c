"""An independent PyTorch reference of Baichuan's published modeling code (modeling_baichuan.py of
Baichuan-7B, Baichuan-13B, Baichuan2-7B and Baichuan2-13B, which ship with the checkpoints; transformers
has no Baichuan class), written from the math those files implement, for the fixtures of
tools/make_zoo_alibi_fixtures.py.

One decoder for all four: RMSNorm before attention and MLP, W_pack = [q; k; v] (each hidden_size rows,
heads in order), SwiGLU MLP (gate_proj, up_proj, down_proj), no biases, untied lm_head. What differs:
  * position: the 7B files rotate q and k (RoPE, base 10000, rotate-half); their config.json carries
    max_position_embeddings. The 13B files add ALiBi, slope_h * (key - query), and their config.json
    has only model_max_length.
  * lm_head: Baichuan2 (its config.json carries z_loss_weight; its vocabulary has 125696 tokens)
    normalises each row of lm_head.weight to unit L2 norm before the product (NormHead); Baichuan 1
    uses the rows as they are.
Padding: attention_mask [B, T] (1 = token); a query never sees padding, and RoPE positions count from
each row's first token, as Baichuan's generation code computes them.
"""
import json
import math
import os

import torch
from safetensors.torch import load_file, save_file


def alibi_slopes(n):
    """2^(-8i/m) for i = 1..m, m the largest power of two <= n; then the odd terms of the 2m sequence."""
    m = 2 ** int(math.floor(math.log2(n)))
    slopes = [2.0 ** (-8.0 * i / m) for i in range(1, m + 1)]
    slopes += [2.0 ** (-8.0 * (2 * j - 1) / (2 * m)) for j in range(1, n - m + 1)]
    return torch.tensor(slopes, dtype=torch.float32)


def uses_rope(config):
    return 'max_position_embeddings' in config


def uses_norm_head(config):
    return 'z_loss_weight' in config or config['vocab_size'] == 125696


def parameter_shapes(config):
    h, f, v = config['hidden_size'], config['intermediate_size'], config['vocab_size']
    shapes = {'model.embed_tokens.weight': (v, h), 'model.norm.weight': (h,), 'lm_head.weight': (v, h)}
    for layer in range(config['num_hidden_layers']):
        p = f'model.layers.{layer}.'
        shapes.update({
            p + 'input_layernorm.weight': (h,),
            p + 'self_attn.W_pack.weight': (3 * h, h),
            p + 'self_attn.o_proj.weight': (h, h),
            p + 'post_attention_layernorm.weight': (h,),
            p + 'mlp.gate_proj.weight': (f, h),
            p + 'mlp.up_proj.weight': (f, h),
            p + 'mlp.down_proj.weight': (h, f),
        })
    return shapes


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, positions):
    """RoPE on x [B, heads, T, d] at positions [B, T]: pairs (k, k + d/2) turned by position * 10000^(-2k/d)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None, :, None] * inv_freq
    cos, sin = torch.cos(angles), torch.sin(angles)
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def logits(config, weights, ids, attention_mask=None):
    """Logits [B, T, vocab] of ids [B, T] under the weights (name -> tensor, requires_grad allowed)."""
    B, T = ids.shape
    h, heads = config['hidden_size'], config['num_attention_heads']
    d, eps = h // heads, config['rms_norm_eps']
    mask = torch.ones(B, T, dtype=torch.long) if attention_mask is None else attention_mask
    query = torch.arange(T)[:, None]
    key = torch.arange(T)[None, :]
    visible = (key <= query)[None, :, :] & mask.bool()[:, None, :]            # [B, T, T]
    if uses_rope(config):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        bias = torch.zeros(1, 1, T, T)
    else:
        bias = alibi_slopes(heads)[None, :, None, None] * (key - query).to(torch.float32)[None, None]
    x = weights['model.embed_tokens.weight'][ids]
    for layer in range(config['num_hidden_layers']):
        p = f'model.layers.{layer}.'
        y = rms_norm(x, weights[p + 'input_layernorm.weight'], eps)
        q, k, v = (y @ weights[p + 'self_attn.W_pack.weight'].t()).split(h, dim=-1)
        q, k, v = (t.reshape(B, T, heads, d).transpose(1, 2) for t in (q, k, v))
        if uses_rope(config):
            q, k = rotate(q, positions), rotate(k, positions)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
        scores = scores.masked_fill(~visible[:, None], float('-inf'))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)   # a padding query sees no key
        attended = (probs @ v).transpose(1, 2).reshape(B, T, h)
        x = x + attended @ weights[p + 'self_attn.o_proj.weight'].t()
        y = rms_norm(x, weights[p + 'post_attention_layernorm.weight'], eps)
        gate = y @ weights[p + 'mlp.gate_proj.weight'].t()
        up = y @ weights[p + 'mlp.up_proj.weight'].t()
        x = x + (torch.nn.functional.silu(gate) * up) @ weights[p + 'mlp.down_proj.weight'].t()
    x = rms_norm(x, weights['model.norm.weight'], eps)
    head = weights['lm_head.weight']
    if uses_norm_head(config):
        head = head / head.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return x @ head.t()


def save(path, config, weights):
    os.makedirs(path, exist_ok=True)
    save_file({name: t.detach().contiguous() for name, t in weights.items()}, os.path.join(path, 'model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write('\n')


def load(path):
    with open(os.path.join(path, 'config.json')) as f:
        config = json.load(f)
    weights = load_file(os.path.join(path, 'model.safetensors'))
    expected = parameter_shapes(config)
    assert set(weights) == set(expected), f'{path}: tensors {sorted(set(weights) ^ set(expected))} differ'
    for name, shape in expected.items():
        assert tuple(weights[name].shape) == shape, f'{path}: {name} has shape {tuple(weights[name].shape)}'
    return config, weights

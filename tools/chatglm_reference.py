"""An independent PyTorch reference of ChatGLM2 / ChatGLM3 (model_type 'chatglm', ChatGLMModel), written
from the math of the published modeling_chatglm.py for tools/make_zoo_rotary_fixtures.py. Its parameter
names are the published checkpoints' (transformer.embedding.word_embeddings, transformer.encoder.layers.N.
{input_layernorm, self_attention.query_key_value, self_attention.dense, post_attention_layernorm,
mlp.dense_h_to_4h, mlp.dense_4h_to_h}, transformer.encoder.final_layernorm, transformer.output_layer, and
the rotary buffer transformer.rotary_pos_emb.inv_freq) and it reads the published config.json keys.

What the block computes (the published layout: RMSNorm, pre-norm residuals, multi-query attention):
  h = x + dense(attention(rope(q), rope(k), v))   with query_key_value(input_layernorm(x)) split into
                                                   [all query heads | the key groups | the value groups]
  y = h + dense_4h_to_h(silu(a) * b)               with [a | b] = dense_h_to_4h(post_attention_layernorm(h))
Rotary embeddings rotate adjacent pairs (2k, 2k + 1) of the first half of each head (kv_channels / 2 dims),
inv_freq = (10000 * rope_ratio)^(-2k / (kv_channels / 2)); each query group's key and value serve
num_attention_heads / multi_query_group_num heads. query_key_value has a bias when add_qkv_bias (or
add_bias_linear), the other linears when add_bias_linear. The padded_vocab_size rows are all vocabulary.
"""
import torch
from torch import nn

from zoo_reference_common import RMSNorm, causal_bias, positions


def rotate_pairs(x, cos, sin):
    """x [B, H, T, D]; cos/sin [B, 1, T, r/2]: rotates pairs (2k, 2k + 1) of the first r dims."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([turned, rest], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.groups, self.head_dim = cfg['num_attention_heads'], cfg['multi_query_group_num'], cfg['kv_channels']
        width = (self.heads + 2 * self.groups) * self.head_dim
        self.query_key_value = nn.Linear(cfg['hidden_size'], width, bias=cfg['add_qkv_bias'] or cfg['add_bias_linear'])
        self.dense = nn.Linear(self.heads * self.head_dim, cfg['hidden_size'], bias=cfg['add_bias_linear'])

    def forward(self, x, cos, sin, bias):
        B, T, _ = x.shape
        d = self.head_dim
        q, k, v = self.query_key_value(x).split([self.heads * d, self.groups * d, self.groups * d], dim=-1)
        q = q.view(B, T, self.heads, d).transpose(1, 2)
        k, v = (t.view(B, T, self.groups, d).transpose(1, 2) for t in (k, v))
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        share = self.heads // self.groups
        k, v = k.repeat_interleave(share, dim=1), v.repeat_interleave(share, dim=1)
        scores = q @ k.transpose(-1, -2) / d ** 0.5 + bias
        out = scores.softmax(-1) @ v
        return self.dense(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, f, bias = cfg['hidden_size'], cfg['ffn_hidden_size'], cfg['add_bias_linear']
        self.dense_h_to_4h = nn.Linear(h, 2 * f, bias=bias)
        self.dense_4h_to_h = nn.Linear(f, h, bias=bias)

    def forward(self, x):
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(nn.functional.silu(a) * b)


class GLMBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, eps = cfg['hidden_size'], cfg['layernorm_epsilon']
        self.input_layernorm, self.self_attention = RMSNorm(h, eps), SelfAttention(cfg)
        self.post_attention_layernorm, self.mlp = RMSNorm(h, eps), MLP(cfg)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class RotaryBuffer(nn.Module):
    """Holds inv_freq as the published checkpoints store it (a persistent buffer)."""
    def __init__(self, dim, base):
        super().__init__()
        self.register_buffer('inv_freq', 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class ChatGLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        for key, want in (('multi_query_attention', True), ('rmsnorm', True), ('post_layer_norm', True),
                          ('apply_residual_connection_post_layernorm', False)):
            assert cfg[key] == want, f'this reference covers {key} = {want} only'
        self.cfg = cfg
        h, vocab = cfg['hidden_size'], cfg['padded_vocab_size']
        encoder = nn.Module()
        encoder.layers = nn.ModuleList(GLMBlock(cfg) for _ in range(cfg['num_layers']))
        encoder.final_layernorm = RMSNorm(h, cfg['layernorm_epsilon'])
        embedding = nn.Module()
        embedding.word_embeddings = nn.Embedding(vocab, h)
        self.transformer = nn.Module()
        self.transformer.embedding = embedding
        self.transformer.rotary_pos_emb = RotaryBuffer(cfg['kv_channels'] // 2, 10000 * cfg.get('rope_ratio', 1))
        self.transformer.encoder = encoder
        self.transformer.output_layer = nn.Linear(h, vocab, bias=False)

    def forward(self, ids, mask):
        """ids, mask [B, T] (mask 0 on left padding) -> logits [B, T, padded_vocab_size]; positions count
        from each row's first real token, and no query sees a padding key."""
        angles = positions(mask)[:, None, :, None] * self.transformer.rotary_pos_emb.inv_freq
        cos, sin, bias = angles.cos(), angles.sin(), causal_bias(mask)
        x = self.transformer.embedding.word_embeddings(ids)
        for block in self.transformer.encoder.layers:
            x = block(x, cos, sin, bias)
        return self.transformer.output_layer(self.transformer.encoder.final_layernorm(x))


def config(hidden_size, ffn_hidden_size, num_layers, heads, groups, vocab_size, seq_length, **extra):
    """A config.json as ChatGLM2/3's published checkpoints write it (chatglm3-6b's keys)."""
    cfg = dict(
        architectures=['ChatGLMModel'], model_type='chatglm', _name_or_path='THUDM/chatglm3-6b',
        auto_map={'AutoConfig': 'configuration_chatglm.ChatGLMConfig',
                  'AutoModel': 'modeling_chatglm.ChatGLMForConditionalGeneration',
                  'AutoModelForCausalLM': 'modeling_chatglm.ChatGLMForConditionalGeneration'},
        add_bias_linear=False, add_qkv_bias=True, apply_query_key_layer_scaling=True,
        apply_residual_connection_post_layernorm=False, attention_dropout=0.0, attention_softmax_in_fp32=True,
        bias_dropout_fusion=True, ffn_hidden_size=ffn_hidden_size, fp32_residual_connection=False,
        hidden_dropout=0.0, hidden_size=hidden_size, kv_channels=hidden_size // heads, layernorm_epsilon=1e-5,
        multi_query_attention=True, multi_query_group_num=groups, num_attention_heads=heads,
        num_layers=num_layers, original_rope=True, padded_vocab_size=vocab_size, post_layer_norm=True,
        rmsnorm=True, seq_length=seq_length, use_cache=True, torch_dtype='float32', tie_word_embeddings=False,
        eos_token_id=2, pad_token_id=0)
    cfg.update(extra)
    return cfg

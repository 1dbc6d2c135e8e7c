#!/usr/bin/env python3
"""An independent PyTorch equivalent of `pmp recipes/pretrain.lua`, for speed and loss comparisons.

Same model (Llama-style GPT in Megatron's layout: RMSNorm, rotate-half RoPE with f32 tables,
SwiGLU with fc1 rows [gate; up], GQA with qkv rows grouped per KV head, tied embeddings, N(0, 0.02)
init with output layers at 0.02/sqrt(2*layers)), same AdamW (PyTorch's formula, no decay on 1-D
params), same Megatron LR schedule and global-norm clipping, same data (char vocabulary = sorted
distinct characters, Megatron-style split, shuffled windows of seq_length+1 tokens overlapping by
one). Flags carry Megatron's names as the recipe's do. Nothing here imports pmp: it is a reference.

  python3 tools/pytorch_pretrain.py --data-path ../shared/data/tinyshakespeare.txt --threads 2
"""
import argparse
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    # Defaults are the recipe's, so the same command line means the same run.
    p.add_argument('--num-layers', type=int, default=4)
    p.add_argument('--hidden-size', type=int, default=192)
    p.add_argument('--ffn-hidden-size', type=int, default=0, help='0: 8/3 of hidden rounded up to 64')
    p.add_argument('--num-attention-heads', type=int, default=6)
    p.add_argument('--num-query-groups', type=int, default=0, help='0: as many as attention heads')
    p.add_argument('--seq-length', type=int, default=64)
    p.add_argument('--micro-batch-size', type=int, default=16)
    p.add_argument('--global-batch-size', type=int, default=16)
    p.add_argument('--train-iters', type=int, default=300)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--min-lr', type=float, default=1e-4)
    p.add_argument('--lr-warmup-iters', type=int, default=30)
    p.add_argument('--lr-decay-iters', type=int, default=0, help='0: train-iters')
    p.add_argument('--lr-decay-style', default='cosine', choices=['cosine', 'linear', 'constant'])
    p.add_argument('--weight-decay', type=float, default=0.1)
    p.add_argument('--adam-beta1', type=float, default=0.9)
    p.add_argument('--adam-beta2', type=float, default=0.95)
    p.add_argument('--adam-eps', type=float, default=1e-8)
    p.add_argument('--clip-grad', type=float, default=1.0)
    p.add_argument('--init-method-std', type=float, default=0.02)
    p.add_argument('--rotary-base', type=float, default=10000)
    p.add_argument('--norm-epsilon', type=float, default=1e-5)
    p.add_argument('--bf16', action='store_true', help='bf16 params/activations, f32 master weights and moments')
    p.add_argument('--data-path', required=True, help='a plain text file')
    p.add_argument('--split', default='969,30,1')
    p.add_argument('--eval-iters', type=int, default=10)
    p.add_argument('--eval-interval', type=int, default=100)
    p.add_argument('--log-interval', type=int, default=20)
    p.add_argument('--seed', type=int, default=1234)
    p.add_argument('--threads', type=int, default=0, help='intra-op threads (0: all cores)')
    return p.parse_args()


# ------------------------------------------------------------------------------------------------
# Data: as pmp.data.TextDataset. The shuffle uses torch's RNG rather than pmp's xorshift, so the
# sample order differs but its distribution (each window once per epoch) is the same.

def split_tokens(tokens, weights):
    parts = [float(w) for w in weights.split(',')]
    parts += [0.0] * (3 - len(parts))
    total, n, start, out = sum(parts), len(tokens), 0, []
    for k in range(3):
        length = n - start if k == 2 else math.floor(n * parts[k] / total + 0.5)
        length = min(length, n - start)
        out.append(tokens[start:start + length] if length > 0 else None)
        start += length
    return out


class TextDataset:
    """Windows [i*seq, i*seq + seq] (seq+1 tokens), visited in a per-epoch shuffled order."""

    def __init__(self, tokens, seq_length, seed):
        self.tokens, self.seq, self.seed = tokens, seq_length, seed
        self.count = (len(tokens) - 1) // seq_length
        self.epoch, self.order = None, None

    def start(self, index):
        epoch = index // self.count
        if epoch != self.epoch:
            self.epoch = epoch
            self.order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self.order[index % self.count]) * self.seq

    def batch(self, first, size):
        block = torch.stack([self.tokens[s:s + self.seq + 1] for s in (self.start(first + k) for k in range(size))])
        return block[:, :-1], block[:, 1:]


# ------------------------------------------------------------------------------------------------
# Model: parameter names and shapes as pmp's GPTModel (Megatron-Core's names).

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalize in f32 (as pmp's kernel and HF's LlamaRMSNorm do), then scale in x's dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.groups, self.d = c.num_attention_heads, c.num_query_groups, c.kv_channels
        self.linear_qkv = nn.Linear(c.hidden_size, (self.heads + 2 * self.groups) * self.d, bias=False)
        self.linear_proj = nn.Linear(self.heads * self.d, c.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        per_group = self.heads // self.groups
        # Rows grouped per KV head: [q heads of group 0, k_0, v_0, q heads of group 1, ...].
        qkv = self.linear_qkv(x).view(B, T, self.groups, per_group + 2, self.d)
        q = qkv[:, :, :, :per_group].reshape(B, T, self.heads, self.d).transpose(1, 2)
        k = qkv[:, :, :, per_group].transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Query head h reads KV head h // per_group, as pmp's attention does.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=per_group > 1)
        return self.linear_proj(o.transpose(1, 2).reshape(B, T, self.heads * self.d))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.linear_fc1 = nn.Linear(c.hidden_size, 2 * c.ffn_hidden_size, bias=False)  # rows [gate; up]
        self.linear_fc2 = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.norm_epsilon)
        self.self_attention = Attention(c)
        self.pre_mlp_layernorm = RMSNorm(c.hidden_size, c.norm_epsilon)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attention(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.pre_mlp_layernorm(x))


class GPTModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.final_layernorm = RMSNorm(c.hidden_size, c.norm_epsilon)
        # RoPE inverse frequencies in f32, as HF computes them.
        d = c.kv_channels
        self.register_buffer('inv_freq', 1.0 / (c.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), persistent=False)
        # Megatron init: N(0, std) everywhere, output layers N(0, std/sqrt(2*layers)); norms at 1.
        std = c.init_method_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                out_layer = name.endswith('linear_proj.weight') or name.endswith('linear_fc2.weight')
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * c.num_layers) if out_layer else std)

    def forward(self, ids, targets):
        T = ids.shape[1]
        x = self.word_embeddings(ids)
        freqs = torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.final_layernorm(x) @ self.word_embeddings.weight.t()  # tied output layer
        # Cross-entropy in f32 (Megatron and pmp do not take the softmax in bf16).
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


# ------------------------------------------------------------------------------------------------

def lr_at(it, a, decay_iters):
    """Megatron's OptimizerParamScheduler: linear warmup from 0, then decay to min_lr."""
    if a.lr_warmup_iters > 0 and it <= a.lr_warmup_iters:
        return a.lr * it / a.lr_warmup_iters
    if a.lr_decay_style == 'constant':
        return a.lr
    if it > decay_iters:
        return a.min_lr
    span = decay_iters - a.lr_warmup_iters
    ratio = (it - a.lr_warmup_iters) / span if span > 0 else 1.0
    if a.lr_decay_style == 'linear':
        return a.min_lr + (a.lr - a.min_lr) * (1 - ratio)
    return a.min_lr + (a.lr - a.min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1)


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main():
    a = parse_args()
    torch.set_num_threads(a.threads if a.threads > 0 else os.cpu_count())
    torch.manual_seed(a.seed)
    rss_at_start = rss_mib()

    with open(a.data_path, encoding='utf-8') as f:
        text = f.read()
    chars = sorted(set(text))  # code-point order = pmp's byte-wise sort of UTF-8 strings
    ids = {ch: k for k, ch in enumerate(chars)}
    tokens = torch.tensor([ids[ch] for ch in text], dtype=torch.long)
    train_tokens, valid_tokens, _ = split_tokens(tokens, a.split)
    train = TextDataset(train_tokens, a.seq_length, a.seed)
    valid = TextDataset(valid_tokens, a.seq_length, a.seed + 1) if valid_tokens is not None and len(valid_tokens) > a.seq_length else None

    a.num_query_groups = a.num_query_groups or a.num_attention_heads
    a.ffn_hidden_size = a.ffn_hidden_size or (a.hidden_size * 8 // 3 + 63) // 64 * 64
    a.kv_channels = a.hidden_size // a.num_attention_heads
    a.vocab_size = len(chars)
    model = GPTModel(a)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    model.to(dtype)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)

    # --bf16 as pmp does it: bf16 parameters (and so bf16 grads and activations); the optimizer
    # updates f32 master copies with f32 moments and writes them back rounded to bf16.
    master = [p.detach().float().clone().requires_grad_() for p in params] if a.bf16 else params
    decay = [m for m in master if m.dim() >= 2]
    no_decay = [m for m in master if m.dim() < 2]
    # fused=True: PyTorch's single-kernel CPU AdamW, the counterpart of pmp's fused step.
    optimizer = torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}], lr=a.lr,
                                  betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps, weight_decay=a.weight_decay,
                                  fused=True)
    decay_iters = a.lr_decay_iters or a.train_iters
    accumulation = a.global_batch_size // a.micro_batch_size

    print(f'pytorch: {a.data_path}, {len(tokens)} tokens (char, vocabulary {len(chars)}); GPTModel(layers={a.num_layers}, '
          f'hidden={a.hidden_size}, heads={a.num_attention_heads}, groups={a.num_query_groups}, ffn={a.ffn_hidden_size}, '
          f'vocab={len(chars)}, tied) {n_params / 1e3:.1f}K params, {"bf16" if a.bf16 else "f32"}')
    print(f'pytorch: torch {torch.__version__}, {torch.get_num_threads()} threads, {train.count} train samples, '
          f'{a.train_iters} steps x {a.global_batch_size} samples x {a.seq_length} tokens')

    def evaluate():
        # The same deterministic batches as the recipe: micro batch k starts at sample k*mbs.
        model.eval()
        total = 0.0
        with torch.no_grad():
            for k in range(a.eval_iters):
                x, y = valid.batch((k * a.micro_batch_size) % valid.count, a.micro_batch_size)
                total += model(x, y).item()
        model.train()
        return total / a.eval_iters

    consumed, train_time, valid_loss = 0, 0.0, None
    intervals = []  # ms per iteration of each log interval
    interval_time, loss_sum, loss_count = 0.0, 0.0, 0
    for it in range(1, a.train_iters + 1):
        t0 = time.perf_counter()
        lr = lr_at(it, a, decay_iters)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for p in params:
            p.grad = None
        step_loss = 0.0
        for _ in range(accumulation):
            x, y = train.batch(consumed, a.micro_batch_size)
            consumed += a.micro_batch_size
            loss = model(x, y)
            (loss / accumulation).backward()
            step_loss += loss.item() / accumulation
        if a.bf16:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
        # clip_grad_norm_ scales by max_norm / (norm + 1e-6) when that is < 1: pmp's rule.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(master, a.clip_grad if a.clip_grad > 0 else float('inf')))
        optimizer.step()
        if a.bf16:
            with torch.no_grad():
                for m, p in zip(master, params):
                    p.copy_(m)
        dt = time.perf_counter() - t0
        train_time += dt
        interval_time += dt
        loss_sum, loss_count = loss_sum + step_loss, loss_count + 1

        if it % a.log_interval == 0 or it == a.train_iters:
            per_it = interval_time / loss_count * 1000
            intervals.append(per_it)
            # The recipe's log-line wording, so one parser reads both.
            print(f' iteration {it:8d}/{a.train_iters:8d} | consumed samples: {consumed:12d} | elapsed time per iteration (ms): '
                  f'{per_it:.1f} | learning rate: {lr:.6E} | global batch size: {a.global_batch_size:5d} | '
                  f'lm loss: {loss_sum / loss_count:.6E} | grad norm: {grad_norm:.3f} | '
                  f'tokens per second: {a.global_batch_size * a.seq_length / per_it * 1000:.0f} |', flush=True)
            interval_time, loss_sum, loss_count = 0.0, 0.0, 0
        if valid is not None and a.eval_interval > 0 and (it % a.eval_interval == 0 or it == a.train_iters):
            valid_loss = evaluate()
            line = f' validation loss at iteration {it} | lm loss value: {valid_loss:.6E} | lm loss PPL: {math.exp(min(valid_loss, 20)):.6E} |'
            print('-' * len(line))
            print(line)
            print('-' * len(line), flush=True)

    # The first interval holds one-time costs (allocator warm-up, oneDNN kernel selection).
    steady = intervals[1:] or intervals
    print(f'pytorch: {a.train_iters} iterations, {train_time:.1f} s training (eval excluded) | '
          f'mean time per iteration after the first interval (ms): {sum(steady) / len(steady):.1f} | '
          f'final validation loss: {valid_loss if valid_loss is not None else float("nan"):.4f} | '
          f'resident memory after imports: {rss_at_start:.1f} MiB | peak resident memory: {rss_mib():.1f} MiB')


if __name__ == '__main__':
    main()

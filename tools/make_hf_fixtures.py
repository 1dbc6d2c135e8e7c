#!/usr/bin/env python3
"""Builds the tiny Hugging Face reference models under spec/fixtures/hf/ (run from the repo root).

    pip install transformers torch safetensors     # torch: only if `python3 -c "import torch"` fails
    python3 tools/make_hf_fixtures.py [--out spec/fixtures/hf] [--check]

For each model: random weights (seeded; larger than transformers' init so logits are far from uniform and
biases/norm weights are not trivially 0/1) saved with `save_pretrained` in float32 (<name>/config.json,
model.safetensors, generation_config.json), plus references computed by transformers in float32 with eager
attention:
  <name>/reference.json          input ids (two rows, length T), loss (labels = ids), the greedy continuation
                                 (generate, do_sample=False, 8 new tokens, no EOS stop), the smallest gap between
                                 the top two logits met while generating, and the L2 norm of the gradient of the
                                 loss for every parameter (by its HF name)
  <name>/reference.safetensors   "logits": the logits [2, T, vocab] of the input ids
Some configs are rewritten to the pre-v5 style (`rope_theta` + `rope_scaling` with `type`) to exercise both
spellings; the script checks that transformers reads the rewritten file to the same logits.
--check reloads every fixture directory with transformers and compares to the stored references.
--verify-export DIR loads DIR/<name> (written by pmp's save_pretrained) with transformers and compares its
logits to the reference of fixture <name> (spec/hf_models_spec.lua runs this with PMP_HF_CHECK=1).

The sizes are deliberately tiny (hidden 32, 2 layers, vocabulary 150, 4 query / 2 KV heads): the whole
directory stays a few hundred KB.
"""
import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
import transformers
from transformers import AutoModelForCausalLM

T = 20
NEW_TOKENS = 8
VOCAB = 150

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class name, config kwargs, rewrite to the old config style?)
MODELS = {
    # Llama, untied, defaults (no bias, no scaling), new-style rope_parameters.
    'llama': ('LlamaConfig', dict(rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0}), False),
    # Llama 3.1-style rope scaling (all three frequency bands hit with head_dim 8 and a short original
    # context), attention_bias (q/k/v/o) and mlp_bias, tied embeddings; written in the old config style.
    'llama3_bias_tied': ('LlamaConfig', dict(
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}), True),
    # Mistral with a sliding window shorter than the sequence, untied.
    'mistral': ('MistralConfig', dict(rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=6,
                                       rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0}), False),
    # Qwen2: q/k/v bias (always), tied, linear rope scaling, old config style with the legacy `type` key.
    'qwen2_tied': ('Qwen2Config', dict(rms_norm_eps=1e-6, tie_word_embeddings=True,
                                        rope_parameters={'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 2.0}),
                   True),
    # Qwen3: per-head q/k RMSNorm, head_dim 16 != hidden / heads = 8, untied.
    'qwen3': ('Qwen3Config', dict(rms_norm_eps=1e-6, tie_word_embeddings=False, head_dim=16,
                                   rope_parameters={'rope_type': 'default', 'rope_theta': 1000000.0}), False),
}


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith('.bias'):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif 'embed_tokens' in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def old_style(config_path):
    """Rewrites rope_parameters into top-level rope_theta + rope_scaling (legacy `type` key for linear)."""
    with open(config_path) as f:
        cfg = json.load(f)
    rp = dict(cfg.pop('rope_parameters'))
    cfg['rope_theta'] = rp.pop('rope_theta')
    kind = rp.pop('rope_type')
    if kind != 'default':
        rp['type' if kind == 'linear' else 'rope_type'] = kind
        cfg['rope_scaling'] = rp
    with open(config_path, 'w') as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write('\n')


def references(model, ids):
    model.eval()
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}
    if model.config.tie_word_embeddings:
        grads.pop('lm_head.weight', None)
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        # The same continuation without a KV cache, and how close the greedy choices were.
        seq, gap = ids, float('inf')
        for _ in range(NEW_TOKENS):
            last = model(input_ids=seq).logits[:, -1, :]
            top = last.topk(2, dim=-1).values
            gap = min(gap, (top[:, 0] - top[:, 1]).min().item())
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(gen, seq), 'generate() and the uncached greedy loop disagree'
    return out.logits.detach(), out.loss.item(), gen[:, ids.shape[1]:].tolist(), gap, grads


def build(name, out_dir):
    cls_name, kwargs, rewrite = MODELS[name]
    cfg = getattr(transformers, cls_name)(**BASE, **kwargs)
    seed = sorted(MODELS).index(name) + 1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation='eager', dtype=torch.float32)
    randomize(model, seed)
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    model.eval()
    # Inputs whose greedy continuation is not decided by a near-tie (a float32 rounding could flip it).
    for attempt in range(100):
        ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(100 * seed + attempt))
        if references(model, ids)[3] > 0.02:
            break
    with torch.no_grad():
        before = model(input_ids=ids).logits
    if rewrite:
        old_style(os.path.join(path, 'config.json'))
    # Reference values come from the saved directory as transformers reads it.
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager', dtype=torch.float32)
    logits, loss, continuation, gap, grads = references(model, ids)
    assert torch.equal(logits, before), f'{name}: the saved directory does not reproduce the model'
    save_file({'logits': logits.contiguous()}, os.path.join(path, 'reference.safetensors'))
    ref = dict(model=name, transformers=transformers.__version__, torch=torch.__version__,
               input_ids=ids.tolist(), loss=loss, greedy=continuation, greedy_min_gap=gap, grad_norms=grads)
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write('\n')
    print(f'{name}: loss {loss:.6f}, greedy gap {gap:.4f}, {sum(p.numel() for p in model.parameters())} params')


def check(out_dir):
    for name in sorted(MODELS):
        path = os.path.join(out_dir, name)
        with open(os.path.join(path, 'reference.json')) as f:
            ref = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager', dtype=torch.float32)
        ids = torch.tensor(ref['input_ids'])
        logits, loss, continuation, _, grads = references(model, ids)
        diff = (logits - load_file(os.path.join(path, 'reference.safetensors'))['logits']).abs().max().item()
        assert diff < 1e-5 and abs(loss - ref['loss']) < 1e-5 and continuation == ref['greedy'], name
        print(f'{name}: ok (max logit diff {diff:.2e})')


def verify_export(out_dir, export_dir):
    names = sorted(n for n in os.listdir(export_dir) if n in MODELS)
    assert names, f'no fixture-named directories in {export_dir}'
    for name in names:
        with open(os.path.join(out_dir, name, 'reference.json')) as f:
            ref = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, name), attn_implementation='eager',
                                                     dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ref['input_ids'])).logits
        want = load_file(os.path.join(out_dir, name, 'reference.safetensors'))['logits']
        diff = (logits - want).abs().max().item()
        assert diff == 0, f'{name}: transformers reads the export to logits that differ by {diff}'
        print(f'{name}: transformers loads the export (max logit diff {diff:.2e})')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='spec/fixtures/hf')
    parser.add_argument('--check', action='store_true', help='compare the fixtures to a fresh transformers run')
    parser.add_argument('--verify-export', metavar='DIR', help='load DIR/<fixture name> with transformers')
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.verify_export:
        verify_export(args.out, args.verify_export)
        return
    if args.check:
        check(args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    for name in MODELS:
        build(name, args.out)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Builds the tiny reference models of the ALiBi families under spec/fixtures/zoo_alibi/ (run from the repo root).

    python3 tools/make_zoo_alibi_fixtures.py [--out spec/fixtures/zoo_alibi] [--verify-export DIR]

bloom: BloomForCausalLM from transformers (6 heads, so the ALiBi slopes take the non-power-of-two path).
baichuan_7b, baichuan_13b, baichuan2_7b, baichuan2_13b: checkpoints with Baichuan's published config keys and
tensor names, computed by tools/baichuan_reference.py (RoPE for the 7B layouts, ALiBi for the 13B ones,
NormHead for Baichuan2).

Each <name>/ holds config.json and model.safetensors as the family publishes them, plus
  reference.json          input_ids [2, T] with the second row left-padded (attention_mask), the loss of the
                          unpadded first row (labels = ids) and the L2 norm of its gradient for every tensor,
                          prompts (the unpadded rows) and their greedy continuations (8 tokens each, batched with
                          left padding), and the smallest gap between the top two logits met while generating
  reference.safetensors   "logits" [2, T, vocab] of the padded batch (rows' padding positions are not compared)
--verify-export DIR loads DIR/<name> (pmp's save_pretrained output) with transformers or the reference and
checks that it gives the stored logits exactly (spec/zoo_alibi_spec.lua runs it under PMP_HF_CHECK=1).
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
import transformers
from transformers import AutoModelForCausalLM, BloomConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baichuan_reference as baichuan  # noqa: E402

T = 12
PAD = 3          # padding tokens at the start of row 2
NEW_TOKENS = 8
VOCAB = 150

BAICHUAN_BASE = dict(
    architectures=['BaichuanForCausalLM'],
    auto_map={'AutoConfig': 'configuration_baichuan.BaichuanConfig',
              'AutoModelForCausalLM': 'modeling_baichuan.BaichuanForCausalLM'},
    model_type='baichuan', hidden_act='silu', hidden_size=48, intermediate_size=64, num_attention_heads=6,
    num_hidden_layers=2, rms_norm_eps=1e-6, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    initializer_range=0.02, tie_word_embeddings=False, torch_dtype='float32', use_cache=True, model_max_length=128,
)
# what each published layout adds to the base keys
BAICHUAN = {
    'baichuan_7b': dict(architectures=['BaiChuanForCausalLM'], max_position_embeddings=128),
    'baichuan_13b': dict(),
    'baichuan2_7b': dict(max_position_embeddings=128, z_loss_weight=0),
    'baichuan2_13b': dict(z_loss_weight=0),
}
NAMES = ['bloom'] + sorted(BAICHUAN)


def random_tensor(name, shape, g):
    if name.endswith('norm.weight') or name.endswith('layernorm.weight') or name.endswith('ln_f.weight'):
        return 1 + 0.2 * torch.randn(shape, generator=g)
    if name.endswith('.bias'):
        return 0.2 * torch.randn(shape, generator=g)
    if 'embed' in name:
        return 0.3 * torch.randn(shape, generator=g)
    if name == 'lm_head.weight':   # rows of unequal norms, so NormHead's normalisation matters
        return torch.randn(shape, generator=g) * (0.5 + torch.rand(shape[0], 1, generator=g)) / math.sqrt(shape[1])
    return torch.randn(shape, generator=g) / math.sqrt(shape[1])


def padded_batch(seed):
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, T, dtype=torch.long)
    ids[1, :PAD] = 0
    mask[1, :PAD] = 0
    return ids, mask


class Family:
    """forward(ids, mask) -> logits, and the parameters by checkpoint name."""

    def __init__(self, name, path):
        self.name = name
        if name == 'bloom':
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager', dtype=torch.float32)
            self.model.eval()
            self.params = dict(self.model.named_parameters())
            self.tied = self.model.config.tie_word_embeddings
        else:
            self.config, self.params = baichuan.load(path)
            self.tied = False

    def __call__(self, ids, mask=None):
        if self.name == 'bloom':
            return self.model(input_ids=ids, attention_mask=mask).logits
        return baichuan.logits(self.config, self.params, ids, mask)


def greedy(family, ids, mask):
    """Greedy continuation of a left-padded batch without a cache, and the smallest top-two gap met."""
    out, gap = [[] for _ in range(ids.shape[0])], float('inf')
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = family(ids, mask)[:, -1, :]
            top = last.topk(2, dim=-1).values
            gap = min(gap, (top[:, 0] - top[:, 1]).min().item())
            chosen = last.argmax(-1, keepdim=True)
            for b in range(ids.shape[0]):
                out[b].append(chosen[b, 0].item())
            ids = torch.cat([ids, chosen], dim=1)
            mask = torch.cat([mask, torch.ones_like(chosen)], dim=1)
    return out, gap


def references(family, ids, mask):
    with torch.no_grad():
        logits = family(ids, mask)
    # loss and gradients of the unpadded first row, labels = ids (shifted inside)
    for p in family.params.values():
        p.requires_grad_(True)
        p.grad = None
    row = ids[:1]
    out = family(row)
    loss = torch.nn.functional.cross_entropy(out[0, :-1], row[0, 1:])
    loss.backward()
    grads = {name: p.grad.norm().item() for name, p in family.params.items() if p.grad is not None}
    if family.tied:
        grads.pop('lm_head.weight', None)
    continuation, gap = greedy(family, ids, mask)
    if family.name == 'bloom':   # transformers' cached generate agrees with the uncached loop
        gen = family.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                    min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        assert gen[:, T:].tolist() == continuation, 'generate() and the uncached greedy loop disagree'
    return logits, loss.item(), grads, continuation, gap


def write_bloom(path, seed):
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=48, n_layer=2, n_head=6, layer_norm_epsilon=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation='eager', dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_tensor(name, p.shape, g))
    model.save_pretrained(path)


def write_baichuan(name, path, seed):
    config = dict(BAICHUAN_BASE, **BAICHUAN[name])
    g = torch.Generator().manual_seed(seed)
    weights = {n: random_tensor(n, shape, g) for n, shape in sorted(baichuan.parameter_shapes(config).items())}
    baichuan.save(path, config, weights)


def build(name, out_dir):
    seed = NAMES.index(name) + 1
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    if name == 'bloom':
        write_bloom(path, seed)
    else:
        write_baichuan(name, path, seed)
    family = Family(name, path)   # the references come from the files as written
    # inputs whose greedy continuation is not decided by a near-tie (a float32 rounding could flip it)
    for attempt in range(100):
        ids, mask = padded_batch(100 * seed + attempt)
        result = references(family, ids, mask)
        if result[4] > 0.02:
            break
    logits, loss, grads, continuation, gap = result
    save_file({'logits': logits.contiguous()}, os.path.join(path, 'reference.safetensors'))
    prompts = [ids[0].tolist(), ids[1, PAD:].tolist()]
    ref = dict(model=name, transformers=transformers.__version__, torch=torch.__version__, input_ids=ids.tolist(),
               attention_mask=mask.tolist(), loss=loss, grad_norms=grads, prompts=prompts, greedy=continuation,
               greedy_min_gap=gap)
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write('\n')
    print(f'{name}: loss {loss:.6f}, greedy gap {gap:.4f}')


def verify_export(out_dir, export_dir):
    names = sorted(n for n in os.listdir(export_dir) if n in NAMES)
    assert names, f'no fixture-named directories in {export_dir}'
    for name in names:
        with open(os.path.join(out_dir, name, 'reference.json')) as f:
            ref = json.load(f)
        family = Family(name, os.path.join(export_dir, name))
        with torch.no_grad():
            logits = family(torch.tensor(ref['input_ids']), torch.tensor(ref['attention_mask']))
        want = load_file(os.path.join(out_dir, name, 'reference.safetensors'))['logits']
        diff = (logits - want).abs().max().item()
        assert diff == 0, f'{name}: the export gives logits that differ by {diff}'
        print(f'{name}: the export gives the reference logits')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='spec/fixtures/zoo_alibi')
    parser.add_argument('--verify-export', metavar='DIR')
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.verify_export:
        verify_export(args.out, args.verify_export)
        return
    os.makedirs(args.out, exist_ok=True)
    for name in NAMES:
        build(name, args.out)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Builds LoRA adapters with the Hugging Face PEFT library for the tiny models of spec/fixtures/hf/ and
the references pmp must reproduce, under spec/fixtures/lora/ (run from the repo root).

    pip install peft transformers torch safetensors
    python3 tools/make_lora_fixtures.py [--out spec/fixtures/lora] [NAME ...]   # default: every fixture
    python3 tools/make_lora_fixtures.py --verify DIR     # DIR/<name>: an adapter pmp wrote + pmp's logits
    python3 tools/make_lora_fixtures.py --verify-merged DIR   # DIR/<name>: a merged model pmp exported

For each fixture <name> (the base model is spec/fixtures/hf/<base>):
  <name>/adapter_config.json, adapter_model.safetensors   what PEFT's save_pretrained writes, with random
                                                           (seeded) non-zero lora_A and lora_B
  <name>/reference.json          the base fixture's name, input ids [2, T], the loss (labels = ids) of the
                                 base model with the adapter, and the L2 norm of that loss's gradient for
                                 every adapter tensor (PEFT's key names)
  <name>/reference.safetensors   "logits": the logits [2, T, vocab] with the adapter applied, f32
--verify DIR loads DIR/<name> with PeftModel.from_pretrained on the base fixture and checks its logits for
DIR/<name>/input.json's ids against DIR/<name>/logits.safetensors (what pmp computed) within 1e-4.
A SEQ_CLS fixture (SEQ_CLS_ADAPTERS: a reward model's adapter) is the base loaded as a
LlamaForSequenceClassification with one label, whose score head PEFT trains and saves beside the adapters
(modules_to_save); its reference.json holds "scores" (the last token's score of each row) instead of
the loss and gradients, and it has no reference.safetensors. --verify compares those scores for it.
--verify-merged DIR loads DIR/<name> (pmp's --merge-lora export) with transformers and checks its logits
for the reference ids against the fixture's reference logits within 1e-4.
"""
import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from peft import LoraConfig, PeftModel, get_peft_model

HF_FIXTURES = 'spec/fixtures/hf'
T = 12
VOCAB = 150

# name -> (base fixture, LoraConfig kwargs)
ADAPTERS = {
    # every linear of the block, so the fused qkv and gate/up layers carry three and two adapters
    'llama_all': ('llama', dict(r=4, lora_alpha=8, lora_dropout=0.05,
                                target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                                'down_proj'])),
    # a subset (k_proj and gate_proj left out of fused layers), rank-stabilised scaling, a biased qkv
    'qwen2_some': ('qwen2_tied', dict(r=2, lora_alpha=6, lora_dropout=0.0, use_rslora=True,
                                      target_modules=['q_proj', 'v_proj', 'up_proj', 'down_proj'])),
}

# name -> (base fixture, LoraConfig kwargs) of reward-model (SEQ_CLS) adapters
SEQ_CLS_ADAPTERS = {
    'llama_score': ('llama', dict(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=['q_proj', 'v_proj', 'down_proj'])),
}


def load_base(base):
    model = AutoModelForCausalLM.from_pretrained(os.path.join(HF_FIXTURES, base), dtype=torch.float32,
                                                 attn_implementation='eager')
    model.eval()
    return model


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def build(name, out_dir):
    base, kwargs = ADAPTERS[name]
    seed = 300 + sorted(ADAPTERS).index(name)
    model = get_peft_model(load_base(base), LoraConfig(task_type='CAUSAL_LM', **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if 'lora_' in pname:
                # B is zero after PEFT's init; both random so that the adapter changes every output
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    model.eval()
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    os.remove(os.path.join(path, 'README.md'))   # PEFT's model card
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    logits = logits_of(model, ids)
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {}
    for pname, p in model.named_parameters():
        if p.grad is not None:
            # PEFT's file names the adapter tensors without the adapter name ('default')
            grads[pname.replace('.default', '')] = p.grad.norm().item()
    save_file({'logits': logits.contiguous()}, os.path.join(path, 'reference.safetensors'))
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump({'base': base, 'input_ids': ids.tolist(), 'loss': loss.item(), 'grad_norms': grads}, f,
                  indent=1, sort_keys=True)
    print(f'{name}: loss {loss.item():.6f}, {len(grads)} adapter tensors')


def load_score_base(base):
    model = AutoModelForSequenceClassification.from_pretrained(os.path.join(HF_FIXTURES, base), num_labels=1,
                                                               dtype=torch.float32, attn_implementation='eager')
    # the score is pooled at the last token that is not padding: no input id is 0
    model.config.pad_token_id = 0
    model.eval()
    return model


def build_seq_cls(name, out_dir):
    base, kwargs = SEQ_CLS_ADAPTERS[name]
    seed = 400 + sorted(SEQ_CLS_ADAPTERS).index(name)
    torch.manual_seed(seed)   # the base's score head, which transformers initialises
    model = get_peft_model(load_score_base(base), LoraConfig(task_type='SEQ_CLS', **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.requires_grad:   # the adapters and the copy of the score head that PEFT trains
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    model.eval()
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    os.remove(os.path.join(path, 'README.md'))
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))
    scores = logits_of(model, ids)[:, 0]
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump({'base': base, 'input_ids': ids.tolist(), 'scores': scores.tolist()}, f, indent=1, sort_keys=True)
    print(f'{name}: scores {scores.tolist()}')


def verify(name, out_dir, pmp_dir):
    seq_cls = name in SEQ_CLS_ADAPTERS
    base, _ = (SEQ_CLS_ADAPTERS if seq_cls else ADAPTERS)[name]
    path = os.path.join(pmp_dir, name)
    model = PeftModel.from_pretrained((load_score_base if seq_cls else load_base)(base), path)
    model.eval()
    with open(os.path.join(path, 'input.json')) as f:
        ids = torch.tensor(json.load(f)['input_ids'])
    expected = load_file(os.path.join(path, 'logits.safetensors'))['logits']
    err = (logits_of(model, ids) - expected).abs().max().item()
    assert err < 1e-4, f'{name}: PEFT with pmp\'s adapter gives logits {err} away from pmp\'s'
    print(f'{name}: PEFT applying pmp\'s adapter matches pmp\'s logits (max diff {err:.2e})')


def verify_merged(name, out_dir, export_dir):
    with open(os.path.join(out_dir, name, 'reference.json')) as f:
        ref = json.load(f)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, name), dtype=torch.float32,
                                                 attn_implementation='eager')
    model.eval()
    expected = load_file(os.path.join(out_dir, name, 'reference.safetensors'))['logits']
    err = (logits_of(model, torch.tensor(ref['input_ids'])) - expected).abs().max().item()
    assert err < 1e-4, f'{name}: the merged export gives logits {err} away from PEFT\'s'
    print(f'{name}: transformers reads the merged export to PEFT\'s logits (max diff {err:.2e})')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='spec/fixtures/lora')
    parser.add_argument('--verify', metavar='DIR')
    parser.add_argument('--verify-merged', metavar='DIR')
    parser.add_argument('names', nargs='*', help='fixtures to build or verify (default: all)')
    args = parser.parse_args()
    for name in args.names:
        if name not in ADAPTERS and name not in SEQ_CLS_ADAPTERS:
            parser.error(f'no fixture {name}')
    for name in args.names or sorted(ADAPTERS) + sorted(SEQ_CLS_ADAPTERS):
        if args.verify:
            verify(name, args.out, args.verify)
        elif args.verify_merged:
            if name in ADAPTERS:
                verify_merged(name, args.out, args.verify_merged)
        elif name in SEQ_CLS_ADAPTERS:
            build_seq_cls(name, args.out)
        else:
            build(name, args.out)


if __name__ == '__main__':
    main()

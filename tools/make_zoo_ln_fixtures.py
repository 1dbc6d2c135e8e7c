#!/usr/bin/env python3
"""Tiny random checkpoints of the LayerNorm-era families (OPT/Galactica, GPT-BigCode/StarCoder 1,
StarCoder 2, Falcon, Falcon-RW with ALiBi) made by transformers, with transformers' outputs as the reference that
spec/zoo_ln_spec.lua compares pmp against (run from the repo root).

    python3 tools/make_zoo_ln_fixtures.py [--out spec/fixtures/zoo_ln]
    python3 tools/make_zoo_ln_fixtures.py --verify-export DIR   # DIR/<name>: pmp's save_pretrained output

For each case: random weights (seeded; LayerNorm weights 1 + noise and biases nonzero, so every tensor
matters) saved with save_pretrained in float32 (<name>/config.json, model.safetensors, with the family's
real config keys and tensor names), and, computed in float32 with eager attention on a LEFT-PADDED batch
(pad id 0, attention_mask; position_ids counted from each row's first real token, as generate does):
  <name>/reference.json          input_ids [B, T], attention_mask, the greedy continuation of each row
                                 (generate, do_sample=False, NEW_TOKENS new tokens, no EOS stop)
  <name>/reference.safetensors   "logits" [B, T, vocab] (only the positions the mask keeps are compared)
--verify-export loads DIR/<name> with transformers and checks its logits against the stored reference.
"""
import argparse
import json
import os
import shutil
import zlib

import torch
from safetensors.torch import load_file, save_file
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 150
NEW_TOKENS = 6
LENGTHS = [12, 9, 5]   # real tokens per row; rows are left-padded to the longest

# name -> (config class, kwargs): each case exercises one layout of its family.
CASES = {
    # OPT / Galactica: pre-LayerNorm, ReLU, learned positions with offset 2, tied, biases.
    'opt': ('OPTConfig', dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, activation_function='relu', do_layer_norm_before=True,
                              word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    # OPT-350m style blocks: post-LayerNorm (no final norm), GELU, untied output.
    'opt_post': ('OPTConfig', dict(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64, activation_function='gelu',
                                   do_layer_norm_before=False, tie_word_embeddings=False, pad_token_id=1,
                                   bos_token_id=2, eos_token_id=2)),
    # OPT-350m's shape: word embeddings narrower than the hidden size (project_in after the lookup,
    # project_out before the tied output), post-LayerNorm without a final norm, ReLU.
    'opt_proj': ('OPTConfig', dict(hidden_size=32, word_embed_proj_dim=16, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, activation_function='relu',
                                   do_layer_norm_before=False, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    # StarCoder 1 / SantaCoder: multi-query attention in a fused c_attn, learned positions, gelu tanh.
    'gpt_bigcode': ('GPTBigCodeConfig', dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                                             multi_query=True, activation_function='gelu_pytorch_tanh',
                                             bos_token_id=1, eos_token_id=2)),
    # GPT-BigCode without multi-query: c_attn interleaved per head (q, k, v); splits under TP=2.
    'gpt_bigcode_mha': ('GPTBigCodeConfig', dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=64,
                                                 multi_query=False, activation_function='gelu',
                                                 bos_token_id=1, eos_token_id=2)),
    # StarCoder 2: GQA, RoPE, LayerNorm with bias, GELU MLP with biases, a sliding window shorter than the batch.
    'starcoder2': ('Starcoder2Config', dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, sliding_window=6, use_bias=True,
                                            norm_epsilon=1e-5, hidden_act='gelu_pytorch_tanh',
                                            rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
                                            bos_token_id=1, eos_token_id=2)),
    # Falcon-7B: multi-query, one LayerNorm shared by attention and MLP in parallel, no biases, rotary.
    'falcon': ('FalconConfig', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, parallel_attn=True, new_decoder_architecture=False,
                                    bias=False, alibi=False, max_position_embeddings=64,
                                    bos_token_id=1, eos_token_id=2)),
    # Falcon-40B/180B: new_decoder_architecture, grouped KV in the fused qkv, ln_attn / ln_mlp, with biases.
    'falcon_new': ('FalconConfig', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                                        new_decoder_architecture=True, parallel_attn=True, bias=True, alibi=False,
                                        ffn_hidden_size=48, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2)),
    # Falcon with sequential attention then MLP (parallel_attn false), per-head q/k/v, untied output.
    'falcon_seq': ('FalconConfig', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=False, parallel_attn=False, new_decoder_architecture=False,
                                        bias=True, alibi=False, max_position_embeddings=64,
                                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # Falcon-RW (falcon-rw-1b): ALiBi instead of rotary positions (the biases divided by sqrt(head_dim) with
    # the scores), sequential attention then MLP, per-head q/k/v, biases.
    'falcon_alibi': ('FalconConfig', dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                          multi_query=False, parallel_attn=False, new_decoder_architecture=False,
                                          bias=True, alibi=True, max_position_embeddings=64,
                                          bos_token_id=1, eos_token_id=2)),
}

# The seed of each case's weights, fixed per name so that adding a case leaves the committed ones as they
# are: a new case takes the next number.
SEEDS = {'falcon': 1000, 'falcon_alibi': 1001, 'falcon_new': 1002, 'falcon_seq': 1003, 'gpt_bigcode': 1004,
         'gpt_bigcode_mha': 1005, 'opt': 1006, 'opt_post': 1007, 'starcoder2': 1008, 'opt_proj': 1009}
assert sorted(SEEDS) == sorted(CASES), 'every case needs its own seed in SEEDS'

# Cases with their own batch lengths and vocabulary, kept out of CASES; each seeded by its name.
# name -> (config class, kwargs, lengths).
LONG_CASES = {
    # Falcon-RW with 32 heads over 300+ positions: transformers' bf16 rounding of the ALiBi biases
    # (build_alibi_tensor) moves the logits well past 1e-4 here. A tiny vocabulary keeps the fixture small.
    'falcon_alibi_long': ('FalconConfig', dict(vocab_size=40, hidden_size=64, num_hidden_layers=1,
                                               num_attention_heads=32, multi_query=False, parallel_attn=False,
                                               new_decoder_architecture=False, bias=True, alibi=True,
                                               max_position_embeddings=512, bos_token_id=1, eos_token_id=2),
                          [330, 297]),
}


def batch(lengths=LENGTHS, vocab=VOCAB):
    g = torch.Generator().manual_seed(11)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


def positions(mask):
    # counted from each row's first real token; padding gets 0 (its outputs are never compared)
    return (mask.cumsum(-1) - 1).clamp(min=0)


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits.float()


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if 'norm' in name or '.ln' in name:
                continue
            p.copy_(0.15 * torch.randn(p.shape, generator=g))


def build(name, out):
    if name in LONG_CASES:
        cls_name, kwargs, lengths = LONG_CASES[name]
        seed = zlib.crc32(name.encode())
    else:
        (cls_name, kwargs), lengths, seed = CASES[name], LENGTHS, SEEDS[name]
    config = getattr(transformers, cls_name)(**{'vocab_size': VOCAB, **kwargs})
    config._attn_implementation = 'eager'
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation='eager').float().eval()
    randomize(model, seed)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    target = os.path.join(out, name)
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target, safe_serialization=True)
    gen = os.path.join(target, 'generation_config.json')
    if os.path.exists(gen):
        os.remove(gen)

    ids, mask = batch(lengths, config.vocab_size)
    logits = logits_of(model, ids, mask)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    greedy = generated[:, ids.shape[1]:].tolist()
    # the file transformers reads back must give the same logits (weights saved as they are used)
    again = AutoModelForCausalLM.from_pretrained(target, attn_implementation='eager').float().eval()
    assert torch.equal(logits_of(again, ids, mask), logits), name + ': save_pretrained does not round trip'
    save_file({'logits': logits.contiguous()}, os.path.join(target, 'reference.safetensors'))
    with open(os.path.join(target, 'reference.json'), 'w') as f:
        json.dump({'input_ids': ids.tolist(), 'attention_mask': mask.tolist(), 'greedy': greedy,
                   'transformers': transformers.__version__}, f)
        f.write('\n')
    print(f'{name}: {sum(p.numel() for p in model.parameters())} parameters, greedy {greedy}')


def verify_export(fixtures, exported):
    for name in sorted(os.listdir(exported)):
        ref_dir = os.path.join(fixtures, name)
        with open(os.path.join(ref_dir, 'reference.json')) as f:
            ref = json.load(f)
        want = load_file(os.path.join(ref_dir, 'reference.safetensors'))['logits']
        ids, mask = torch.tensor(ref['input_ids']), torch.tensor(ref['attention_mask'])
        model = AutoModelForCausalLM.from_pretrained(os.path.join(exported, name), attn_implementation='eager')
        got = logits_of(model.float().eval(), ids, mask)
        keep = mask.bool()
        diff = (got[keep] - want[keep]).abs().max().item()
        if diff > 1e-4:
            raise SystemExit(f'{name}: transformers reads the export to logits {diff:g} away from the reference')
        print(f'{name}: transformers reads the export to the reference logits (max diff {diff:g})')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='spec/fixtures/zoo_ln')
    parser.add_argument('--verify-export', metavar='DIR')
    args = parser.parse_args()
    if args.verify_export:
        verify_export(args.out, args.verify_export)
        return
    os.makedirs(args.out, exist_ok=True)
    for name in [*CASES, *LONG_CASES]:
        build(name, args.out)


if __name__ == '__main__':
    main()

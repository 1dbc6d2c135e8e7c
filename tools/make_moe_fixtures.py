#!/usr/bin/env python3
"""Builds the tiny mixture-of-experts Hugging Face models under spec/fixtures/moe/ (run from the repo root).

    python3 tools/make_moe_fixtures.py [--out spec/fixtures/moe] [--check] [--verify-export DIR]

For each family (mixtral, qwen2_moe, qwen3_moe): random weights (seeded) saved with `save_pretrained` in
float32, plus references computed by transformers in float32 with eager attention on a batch of two
prompts, the second left-padded (pad id 0, attention_mask 0, position ids counted from its first real token):
  <name>/reference.json          the prompts (ids and mask), the greedy continuation of each (generate,
                                 do_sample=False, 8 new tokens, no EOS stop), the smallest gap between the
                                 top two logits while generating and the smallest gap between the k-th and
                                 (k+1)-th router probability of any real token in any layer (seeds are
                                 drawn until neither is a near-tie that float32 rounding could flip)
  <name>/reference.safetensors   "logits": the logits [2, T, vocab] of the padded batch (compare only where
                                 the mask is 1)
--check reloads every fixture with transformers and compares to the stored references.
--verify-export DIR loads DIR/<name> and DIR/<name>_from_config (written by pmp) with transformers and
compares their logits to the fixture's (spec/moe_models_spec.lua runs this with PMP_HF_CHECK=1).
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import make_hf_fixtures
import transformers
from transformers import AutoModelForCausalLM

T = 12
PADDING = 4
NEW_TOKENS = 8
VOCAB = 120

BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

MODELS = {
    # every layer MoE, top-2 of 4 renormalised
    'mixtral': ('MixtralConfig', dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=24,
                                      rms_norm_eps=1e-5, rope_parameters={'rope_type': 'default', 'rope_theta': 1e6})),
    # layer 1 dense (mlp_only_layers), top-2 of 4 without renormalising, gated shared expert
    'qwen2_moe': ('Qwen2MoeConfig', dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, mlp_only_layers=[1], norm_topk_prob=False,
                                         rms_norm_eps=1e-6)),
    # every layer MoE, top-3 of 6 renormalised, q/k norms, head_dim 16
    'qwen3_moe': ('Qwen3MoeConfig', dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                                         norm_topk_prob=True, head_dim=16, rms_norm_eps=1e-6)),
    # multi-latent attention with q through a low rank and interleaved RoPE scaled by YaRN (an original context
    # whose correction range falls between the rotary dims, so the ramp blends and its truncation matters;
    # mscale != mscale_all_dim, so cos/sin and the softmax scale both change); layer 0 dense, layer 1 MoE:
    # sigmoid scores with a correction bias, top-4 of 8 from the best 2 of 4 groups, scaled, one shared expert
    'deepseek_v3': ('DeepseekV3Config', dict(num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4,
                                             qk_nope_head_dim=6, v_head_dim=5, n_routed_experts=8, num_experts_per_tok=4,
                                             n_group=4, topk_group=2, moe_intermediate_size=16, n_shared_experts=1,
                                             first_k_dense_replace=1, routed_scaling_factor=2.5,
                                             rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0,
                                                              'original_max_position_embeddings': 6000, 'beta_fast': 32,
                                                              'beta_slow': 1, 'mscale': 1.0, 'mscale_all_dim': 0.8})),
    # DeepSeek-V2: softmax top-3 of 8 without renormalising, from the one of 2 groups with the best single
    # expert (not Megatron's sum of the best 3), scaled; queries without the low rank; layer 0 dense
    'deepseek_v2': ('DeepseekV2Config', dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                                             qk_nope_head_dim=6, v_head_dim=5, n_routed_experts=8, num_experts_per_tok=3,
                                             n_group=2, topk_group=1, topk_method='group_limited_greedy',
                                             moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                                             routed_scaling_factor=1.5,
                                             rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})),
    # queries without the low rank, RoPE on rotate-half pairs, every layer MoE, v wider than q/k heads
    'deepseek_v3_direct_q': ('DeepseekV3Config', dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=8,
                                                      qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=12,
                                                      rope_interleave=False, n_routed_experts=4, num_experts_per_tok=2,
                                                      n_group=2, topk_group=1, moe_intermediate_size=16,
                                                      n_shared_experts=2, first_k_dense_replace=0,
                                                      routed_scaling_factor=1.5, rope_scaling=None,
                                                      rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})),
}


def randomize(model, seed):
    """make_hf_fixtures' weights, and DeepSeek's routing correction bias (a buffer) away from zero."""
    make_hf_fixtures.randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith('e_score_correction_bias'):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def choice_gap(selection, k, groups=None, group_topk=None, group_score_topk=2):
    """Per token, the smallest margin of the routing choice: between the k-th and (k+1)-th selection score
    (among the experts of the chosen groups), and between the last chosen and the first other group (a
    group scores the sum of its best group_score_topk experts)."""
    gap = None
    if groups:
        per_group = selection.view(selection.shape[0], groups, -1).topk(group_score_topk, dim=-1).values.sum(-1)
        top = per_group.topk(group_topk + 1, dim=-1)
        gap = top.values[:, group_topk - 1] - top.values[:, group_topk]
        allowed = torch.zeros_like(per_group).scatter(1, top.indices[:, :group_topk], 1).bool()
        mask = allowed.unsqueeze(-1).expand(-1, groups, selection.shape[1] // groups).reshape(selection.shape)
        selection = selection.masked_fill(~mask, float('-inf'))
    top = selection.topk(k + 1, dim=-1).values
    experts = top[:, k - 1] - top[:, k]
    return experts if gap is None else torch.minimum(experts, gap)


def router_gap(model, ids, mask):
    """The smallest margin of any routing choice over real tokens and layers (see choice_gap)."""
    gaps = []
    cfg = model.config
    k = cfg.num_experts_per_tok

    def hook(module, _inputs, output):
        if hasattr(module, 'e_score_correction_bias'):
            selection = output[0].float().sigmoid() + module.e_score_correction_bias
            margin = choice_gap(selection, k, cfg.n_group, cfg.topk_group)
        elif getattr(cfg, 'topk_method', None) == 'group_limited_greedy':
            margin = choice_gap(torch.softmax(output[0].float(), dim=-1), k, cfg.n_group, cfg.topk_group, 1)
        else:
            margin = choice_gap(torch.softmax(output[0].float(), dim=-1), k)
        real = mask.reshape(-1).bool()
        gaps.append(margin[real].min().item())

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith('mlp.gate')
               or n.endswith('block_sparse_moe.gate')]
    assert handles, 'no router found'
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    for h in handles:
        h.remove()
    return min(gaps)


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def references(model, ids, mask):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        # the same continuation without a KV cache, and how close the greedy choices were
        seq, seq_mask, gap = ids, mask, float('inf')
        for _ in range(NEW_TOKENS):
            last = model(input_ids=seq, attention_mask=seq_mask, position_ids=positions(seq_mask)).logits[:, -1, :]
            top = last.topk(2, dim=-1).values
            gap = min(gap, (top[:, 0] - top[:, 1]).min().item())
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert torch.equal(gen, seq), 'generate() and the uncached greedy loop disagree'
    return logits, gen[:, ids.shape[1]:].tolist(), gap, router_gap(model, seq, seq_mask)


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :PADDING] = 0
    mask[1, :PADDING] = 0
    return ids, mask


def build(name, out_dir):
    cls_name, kwargs = MODELS[name]
    cfg = getattr(transformers, cls_name)(**{**BASE, **kwargs})
    seed = sorted(MODELS).index(name) + 1
    path = os.path.join(out_dir, name)
    for attempt in range(100):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation='eager', dtype=torch.float32)
        randomize(model, 1000 * seed + attempt)
        ids, mask = inputs(100 * seed + attempt)
        _, _, gap, rgap = references(model, ids, mask)
        if gap > 0.02 and rgap > 1e-3:
            break
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    # reference values come from the saved directory as transformers reads it
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager', dtype=torch.float32)
    logits, continuation, gap, rgap = references(model, ids, mask)
    save_file({'logits': logits.contiguous()}, os.path.join(path, 'reference.safetensors'))
    ref = dict(model=name, transformers=transformers.__version__, torch=torch.__version__, input_ids=ids.tolist(),
               attention_mask=mask.tolist(), greedy=continuation, greedy_min_gap=gap, router_min_gap=rgap)
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write('\n')
    print(f'{name}: greedy gap {gap:.4f}, router gap {rgap:.4f}, {sum(p.numel() for p in model.parameters())} params')


def load_reference(out_dir, name):
    with open(os.path.join(out_dir, name, 'reference.json')) as f:
        ref = json.load(f)
    want = load_file(os.path.join(out_dir, name, 'reference.safetensors'))['logits']
    return ref, torch.tensor(ref['input_ids']), torch.tensor(ref['attention_mask']), want


def check(out_dir):
    for name in sorted(MODELS):
        ref, ids, mask, want = load_reference(out_dir, name)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, name), attn_implementation='eager',
                                                     dtype=torch.float32)
        logits, continuation, _, _ = references(model, ids, mask)
        diff = (logits - want).abs().max().item()
        assert diff < 1e-5 and continuation == ref['greedy'], name
        print(f'{name}: ok (max logit diff {diff:.2e})')


def verify_export(out_dir, export_dir):
    names = sorted(n for n in os.listdir(export_dir) if n.split('_from_config')[0] in MODELS)
    assert names, f'no fixture-named directories in {export_dir}'
    for name in names:
        ref, ids, mask, want = load_reference(out_dir, name.split('_from_config')[0])
        model = AutoModelForCausalLM.from_pretrained(os.path.join(export_dir, name), attn_implementation='eager',
                                                     dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        diff = (logits - want).abs().max().item()
        assert diff == 0, f'{name}: transformers reads the export to logits that differ by {diff}'
        print(f'{name}: transformers loads the export (max logit diff {diff:.2e})')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='spec/fixtures/moe')
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

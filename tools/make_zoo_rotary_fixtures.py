#!/usr/bin/env python3
"""Builds the tiny reference models of the rotary families under spec/fixtures/zoo_rotary/ (run from the
repo root): GLM and GLM-4 written by transformers, Qwen 1 and ChatGLM2/3 by the independent PyTorch
references tools/qwen_reference.py and tools/chatglm_reference.py (those families ship their own modeling
code, not a transformers class). Each reference is also checked against its transformers twin (Qwen2's
block for Qwen 1, GLM's for ChatGLM2/3, with the weights renamed and split): a second, independent
implementation of the same network.

    python3 tools/make_zoo_rotary_fixtures.py [--out spec/fixtures/zoo_rotary]
    python3 tools/make_zoo_rotary_fixtures.py --verify-export DIR

Each <name>/ holds config.json and model.safetensors as the family's published checkpoints name them
(random seeded weights, float32), plus
  reference.json          input_ids [2, T] whose second row is left-padded with PAD ids, its attention_mask,
                          the greedy continuation of each row (8 tokens, recomputed without a cache, the
                          padded row keeping its padding) and the smallest gap between the top two logits
                          met while choosing them
                          the mean next-token cross-entropy of the padded batch (padding never a target)
                          and the L2 norm of its gradient for every parameter, by the checkpoint's names
  reference.safetensors   "logits" [2, T, vocab] of the padded batch (positions count from each row's first
                          real token; padding keys are masked)
--verify-export DIR loads DIR/<name> (pmp's save_pretrained output) with transformers or the reference and
checks that it gives the stored logits exactly (spec/zoo_rotary_spec.lua runs it with PMP_HF_CHECK=1).
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
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chatglm_reference  # noqa: E402
import qwen_reference  # noqa: E402

T, PAD, NEW_TOKENS, VOCAB = 16, 5, 8, 150

HF_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# name -> how to build it: ('hf', config class, kwargs) or ('ref', reference module, config.json table)
MODELS = {
    # GLM-4-9B's layout: head_dim 8 (= hidden / heads), the default partial rotary factor 0.5, untied.
    'glm': ('hf', 'GlmConfig', dict(head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                     rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0,
                                                      'partial_rotary_factor': 0.5})),
    # GLM-4-0414's sandwich norms; head_dim 16 != hidden / heads, rotary on 3/4 of each head, tied.
    'glm4': ('hf', 'Glm4Config', dict(head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                       rope_parameters={'rope_type': 'default', 'rope_theta': 500.0,
                                                        'partial_rotary_factor': 0.75})),
    # Qwen-7B's layout: multi-head attention, c_attn with bias, no other biases.
    'qwen': ('ref', qwen_reference, qwen_reference.config(hidden_size=32, intermediate_size=80, num_layers=2, heads=4,
                                                          vocab_size=VOCAB, seq_length=64)),
    # chatglm3-6b's layout: 4 query heads in 2 multi-query groups, rope_ratio as ChatGLM3-32k has.
    'chatglm': ('ref', chatglm_reference, chatglm_reference.config(hidden_size=32, ffn_hidden_size=40, num_layers=2,
                                                                   heads=4, groups=2, vocab_size=VOCAB,
                                                                   seq_length=64, rope_ratio=2.0)),
}


def reference_model(module):
    return module.QwenLM if module is qwen_reference else module.ChatGLM


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight') or name.endswith('ln_1.weight') or name.endswith('ln_2.weight') \
                    or name.endswith('ln_f.weight'):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith('.bias'):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and ('embed' in name or 'wte' in name):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def load(name, path):
    """The model in path as its family's reference reads it: forward(ids, mask) -> logits."""
    kind, what, _ = MODELS[name]
    if kind == 'hf':
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager', dtype=torch.float32).eval()

        def forward(ids, mask):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            return model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        return model, forward
    with open(os.path.join(path, 'config.json')) as f:
        cfg = json.load(f)
    model = reference_model(what)(cfg).eval()
    state = load_file(os.path.join(path, 'model.safetensors'))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the rotary buffer is computed from the config; published ChatGLM files carry it, pmp's exports do not
    assert not unexpected and set(missing) <= {'transformer.rotary_pos_emb.inv_freq'}, (missing, unexpected)
    return model, model


def save(name, path, seed):
    kind, what, cfg = MODELS[name]
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(seed)
    if kind == 'hf':
        config = getattr(transformers, what)(**HF_BASE, **cfg)
        model = AutoModelForCausalLM.from_config(config, attn_implementation='eager', dtype=torch.float32)
        randomize(model, seed)
        model.save_pretrained(path)
        return
    model = reference_model(what)(cfg)
    randomize(model, seed)
    os.makedirs(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, 'model.safetensors'),
              metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write('\n')


def greedy(forward, ids, mask):
    """NEW_TOKENS greedy tokens per row, each step re-running the whole padded batch; the smallest top-2 gap."""
    out, gap = [], float('inf')
    for _ in range(NEW_TOKENS):
        last = forward(ids, mask)[:, -1, :]
        top = last.topk(2, dim=-1).values
        gap = min(gap, (top[:, 0] - top[:, 1]).min().item())
        token = last.argmax(-1, keepdim=True)
        out.append(token)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(out, 1).tolist(), gap


def loss_and_grad_norms(model, forward, ids, mask):
    """Mean cross-entropy of each real token after the first of its row given the tokens before it, and the
    gradient norm of every parameter (a tied lm_head is the embedding, counted once)."""
    model.zero_grad()
    logits = forward(ids, mask)
    # position t predicts token t + 1 when both are real (a padding position predicts nothing)
    targets = ids[:, 1:].masked_fill((mask[:, :-1] == 0) | (mask[:, 1:] == 0), -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def transformers_twin(name, cfg, state):
    """The same network as a transformers model, for cross-checking a reference: Qwen 1 is Qwen2's block
    (multi-head, q/k/v bias only, rotate-half rotary); ChatGLM2/3 is GLM's (transformers converts GLM-4-9B's
    ChatGLM-format files to it: interleaved rotary on half of each head, gate_up_proj)."""
    if name == 'qwen':
        heads, d = cfg['num_attention_heads'], cfg['kv_channels']
        twin = transformers.Qwen2Config(
            vocab_size=cfg['vocab_size'], hidden_size=cfg['hidden_size'], intermediate_size=cfg['intermediate_size'] // 2,
            num_hidden_layers=cfg['num_hidden_layers'], num_attention_heads=heads, num_key_value_heads=heads, head_dim=d,
            rms_norm_eps=cfg['layer_norm_epsilon'], tie_word_embeddings=cfg['tie_word_embeddings'],
            rope_parameters={'rope_type': 'default', 'rope_theta': float(cfg['rotary_emb_base'])})
        out = {'model.embed_tokens.weight': state['transformer.wte.weight'], 'model.norm.weight': state['transformer.ln_f.weight'],
               'lm_head.weight': state['lm_head.weight']}
        for i in range(cfg['num_hidden_layers']):
            h, m = f'transformer.h.{i}.', f'model.layers.{i}.'
            for part in ('weight', 'bias'):
                q, k, v = state[h + 'attn.c_attn.' + part].chunk(3)
                out.update({m + 'self_attn.q_proj.' + part: q, m + 'self_attn.k_proj.' + part: k, m + 'self_attn.v_proj.' + part: v})
            out.update({m + 'self_attn.o_proj.weight': state[h + 'attn.c_proj.weight'],
                        m + 'input_layernorm.weight': state[h + 'ln_1.weight'],
                        m + 'post_attention_layernorm.weight': state[h + 'ln_2.weight'],
                        m + 'mlp.gate_proj.weight': state[h + 'mlp.w2.weight'], m + 'mlp.up_proj.weight': state[h + 'mlp.w1.weight'],
                        m + 'mlp.down_proj.weight': state[h + 'mlp.c_proj.weight']})
    else:
        heads, groups, d = cfg['num_attention_heads'], cfg['multi_query_group_num'], cfg['kv_channels']
        twin = transformers.GlmConfig(
            vocab_size=cfg['padded_vocab_size'], hidden_size=cfg['hidden_size'], intermediate_size=cfg['ffn_hidden_size'],
            num_hidden_layers=cfg['num_layers'], num_attention_heads=heads, num_key_value_heads=groups, head_dim=d,
            rms_norm_eps=cfg['layernorm_epsilon'], tie_word_embeddings=False, pad_token_id=0, attention_bias=True,
            rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0 * cfg['rope_ratio'], 'partial_rotary_factor': 0.5})
        out = {'model.embed_tokens.weight': state['transformer.embedding.word_embeddings.weight'],
               'model.norm.weight': state['transformer.encoder.final_layernorm.weight'],
               'lm_head.weight': state['transformer.output_layer.weight']}
        for i in range(cfg['num_layers']):
            h, m = f'transformer.encoder.layers.{i}.', f'model.layers.{i}.'
            for part in ('weight', 'bias'):
                q, k, v = state[h + 'self_attention.query_key_value.' + part].split([heads * d, groups * d, groups * d])
                out.update({m + 'self_attn.q_proj.' + part: q, m + 'self_attn.k_proj.' + part: k, m + 'self_attn.v_proj.' + part: v})
            out.update({m + 'self_attn.o_proj.weight': state[h + 'self_attention.dense.weight'],
                        m + 'input_layernorm.weight': state[h + 'input_layernorm.weight'],
                        m + 'post_attention_layernorm.weight': state[h + 'post_attention_layernorm.weight'],
                        m + 'mlp.gate_up_proj.weight': state[h + 'mlp.dense_h_to_4h.weight'],
                        m + 'mlp.down_proj.weight': state[h + 'mlp.dense_4h_to_h.weight']})
    model = AutoModelForCausalLM.from_config(twin, attn_implementation='eager', dtype=torch.float32).eval()
    model.load_state_dict(out, strict=True)
    return model


def cross_check(name, model, ids, mask, logits):
    """The reference's logits of real positions against its transformers twin's."""
    twin = transformers_twin(name, model.cfg, model.state_dict())
    with torch.no_grad():
        want = twin(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    diff = (logits - want)[mask.bool()].abs().max().item()
    assert diff < 1e-5, f'{name}: the reference and transformers\' twin differ by {diff}'
    print(f'{name}: the reference agrees with its transformers twin (max logit diff {diff:.1e})')


def build(name, out_dir):
    seed = sorted(MODELS).index(name) + 1
    path = os.path.join(out_dir, name)
    save(name, path, seed)
    model, forward = load(name, path)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :PAD] = 0
    with torch.no_grad():
        # inputs whose greedy continuation is not decided by a near-tie (a float32 rounding could flip it)
        for attempt in range(100):
            ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(100 * seed + attempt))
            ids[1, :PAD] = 0
            continuation, gap = greedy(forward, ids, mask)
            if gap > 0.02:
                break
        logits = forward(ids, mask)
    if MODELS[name][0] == 'ref':
        cross_check(name, model, ids, mask, logits)
    loss, grads = loss_and_grad_norms(model, forward, ids, mask)
    save_file({'logits': logits.contiguous()}, os.path.join(path, 'reference.safetensors'))
    ref = dict(model=name, transformers=transformers.__version__, torch=torch.__version__, input_ids=ids.tolist(),
               attention_mask=mask.tolist(), greedy=continuation, greedy_min_gap=gap, loss=loss, grad_norms=grads)
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write('\n')
    print(f'{name}: greedy gap {gap:.4f}')


def verify_export(out_dir, export_dir):
    names = sorted(n for n in os.listdir(export_dir) if n in MODELS)
    assert names, f'no fixture-named directories in {export_dir}'
    for name in names:
        with open(os.path.join(out_dir, name, 'reference.json')) as f:
            ref = json.load(f)
        _, forward = load(name, os.path.join(export_dir, name))
        with torch.no_grad():
            logits = forward(torch.tensor(ref['input_ids']), torch.tensor(ref['attention_mask']))
        want = load_file(os.path.join(out_dir, name, 'reference.safetensors'))['logits']
        diff = (logits - want).abs().max().item()
        assert diff == 0, f'{name}: the reference reads the export to logits that differ by {diff}'
        print(f'{name}: the reference loads the export (max logit diff {diff:.2e})')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='spec/fixtures/zoo_rotary')
    parser.add_argument('--verify-export', metavar='DIR', help='load DIR/<fixture name> with the reference')
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.verify_export:
        verify_export(args.out, args.verify_export)
        return
    os.makedirs(args.out, exist_ok=True)
    for name in MODELS:
        build(name, args.out)


if __name__ == '__main__':
    main()

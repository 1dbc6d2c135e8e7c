#!/usr/bin/env python3
"""The transformers side of tools/bench_generate.sh (an independent reference; run through that script).

    python3 tools/bench_generate.py make DIR [--hidden 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1408 --vocab 32000]
        builds a random-weight float32 Llama model with transformers and save_pretrained()s it to DIR, plus
        DIR/bench_prompts.json: 4 prompts of different lengths (0-based token ids, seeded)
    python3 tools/bench_generate.py run DIR --batch B --new N --threads T --reps R --out OUT.json
        greedy model.generate (use_cache=True, left padding + attention mask) on the first B prompts: one
        warm-up run, then R timed runs; writes {seconds: [...], tokens: [[...] per row], min_gap} to OUT.json
        (min_gap: the smallest top-1/top-2 logit gap met while generating, to judge greedy mismatches)
"""
import argparse
import json
import math
import os
import time

import torch

PROMPT_LENGTHS = [37, 12, 58, 25]


def make(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
        rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    # Weights a bit larger than transformers' init (std 0.02), so the logits are far from uniform and
    # the greedy choice is rarely a near-tie.
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.fill_(1.0)
            elif 'embed_tokens' in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(args.dir, safe_serialization=True)
    g = torch.Generator().manual_seed(99)
    prompts = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    with open(os.path.join(args.dir, 'bench_prompts.json'), 'w') as f:
        json.dump(prompts, f)
    n = sum(p.numel() for p in model.parameters())
    print(f'built {args.dir}: {n / 1e6:.1f}M parameters, float32')


def run(args):
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    with open(os.path.join(args.dir, 'bench_prompts.json')) as f:
        prompts = json.load(f)[:args.batch]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)

    def generate(scores=False):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                  max_new_tokens=args.new, eos_token_id=None, pad_token_id=0,
                                  output_scores=scores, return_dict_in_generate=scores)

    out = generate(scores=True)  # warm-up, and the greedy margins
    gap = math.inf
    for s in out.scores:
        top = s.topk(2, dim=-1).values
        gap = min(gap, (top[:, 0] - top[:, 1]).min().item())
    seconds = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        seq = generate()
        seconds.append(time.perf_counter() - t0)
    tokens = seq[:, longest:].tolist()
    assert tokens == out.sequences[:, longest:].tolist()
    with open(args.out, 'w') as f:
        json.dump({'seconds': seconds, 'tokens': tokens, 'min_gap': gap, 'torch': torch.__version__,
                   'threads': torch.get_num_threads()}, f)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest='cmd', required=True)
    m = sub.add_parser('make')
    m.add_argument('dir')
    m.add_argument('--hidden', type=int, default=512)
    m.add_argument('--layers', type=int, default=8)
    m.add_argument('--heads', type=int, default=8)
    m.add_argument('--kv-heads', type=int, default=4)
    m.add_argument('--ffn', type=int, default=1408)
    m.add_argument('--vocab', type=int, default=32000)
    r = sub.add_parser('run')
    r.add_argument('dir')
    r.add_argument('--batch', type=int, default=1)
    r.add_argument('--new', type=int, default=64)
    r.add_argument('--threads', type=int, default=2)
    r.add_argument('--reps', type=int, default=3)
    r.add_argument('--out', required=True)
    args = ap.parse_args()
    make(args) if args.cmd == 'make' else run(args)


if __name__ == '__main__':
    main()

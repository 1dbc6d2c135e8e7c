#!/usr/bin/env python3
"""The transformers side of tools/bench_load.sh (an independent reference; run through that script).

    python3 tools/bench_load.py make DIR [--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --ffn 8192 --vocab 32000]
        builds a random-weight bfloat16 Llama model with transformers and save_pretrained()s it to DIR in
        500MB shards (about 1.1B parameters, 2.2 GB with the defaults)
    python3 tools/bench_load.py load DIR --threads T --out OUT.json
        from_pretrained(DIR, dtype=bfloat16) in this fresh process, then the first token generate() makes
        (greedy) from an 8-token prompt (time to first token = load_s + first_token_s), then one forward
        of 8 tokens; writes {load_s, rss_load_kib, first_token_s, forward_s, rss_forward_kib} (peak
        resident memory, VmHWM, after loading, and after the token and the forward)
"""
import argparse
import json
import time

import torch


def vm_hwm_kib():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    raise RuntimeError('no VmHWM in /proc/self/status')


def make(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(1234)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device('meta'):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device='cpu')
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(args.dir, max_shard_size='500MB')
    n = sum(p.numel() for p in model.parameters())
    print(f'made {args.dir}: {n / 1e9:.3f}B parameters, bfloat16')


def load(args):
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    rss_load = vm_hwm_kib()
    prompt = torch.arange(11, 19).unsqueeze(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1, do_sample=False)
    first_token_s = time.perf_counter() - t0
    ids = torch.arange(8).unsqueeze(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids)
    forward_s = time.perf_counter() - t0
    with open(args.out, 'w') as f:
        json.dump({'load_s': load_s, 'rss_load_kib': rss_load, 'first_token_s': first_token_s, 'forward_s': forward_s,
                   'rss_forward_kib': vm_hwm_kib()}, f)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest='cmd', required=True)
    m = sub.add_parser('make')
    m.add_argument('dir')
    m.add_argument('--hidden', type=int, default=2048)
    m.add_argument('--layers', type=int, default=16)
    m.add_argument('--heads', type=int, default=32)
    m.add_argument('--kv-heads', type=int, default=8)
    m.add_argument('--ffn', type=int, default=8192)
    m.add_argument('--vocab', type=int, default=32000)
    r = sub.add_parser('load')
    r.add_argument('dir')
    r.add_argument('--threads', type=int, default=2)
    r.add_argument('--out', required=True)
    args = p.parse_args()
    make(args) if args.cmd == 'make' else load(args)


if __name__ == '__main__':
    main()

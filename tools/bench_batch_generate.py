#!/usr/bin/env python3
"""The transformers side of tools/bench_batch_generate.sh (run through that script).

    python3 tools/bench_batch_generate.py workload OUT.json --requests 256 [--seed 7 --vocab 32000
            --prompt-min 10 --prompt-max 400 --output-min 16 --output-max 256]
        writes the seeded workload: [{"prompt": [ids], "max_tokens": n}, ...], prompt and output lengths
        uniform in their ranges
    python3 tools/bench_batch_generate.py run DIR WORKLOAD.json --batch B --threads T --out OUT.json
        transformers' batched greedy generate in padded static batches: the requests in input order, B at
        a time, left-padded with an attention mask, each batch run to the largest max_tokens in it (a
        static batch ends when its longest request does); a warm-up batch first. Writes {seconds,
        tokens: [[the first max_tokens ids of each request]]} to OUT.json.
"""
import argparse
import json
import random
import time

import torch


def workload(args):
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.requests):
        length = rng.randint(args.prompt_min, args.prompt_max)
        requests.append({'prompt': [rng.randrange(3, args.vocab) for _ in range(length)],
                         'max_tokens': rng.randint(args.output_min, args.output_max)})
    with open(args.out, 'w') as f:
        json.dump(requests, f)


def run(args):
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    with open(args.workload) as f:
        requests = json.load(f)

    def generate(batch):
        longest = max(len(r['prompt']) for r in batch)
        ids = torch.tensor([[0] * (longest - len(r['prompt'])) + r['prompt'] for r in batch], dtype=torch.long)
        mask = torch.tensor([[0] * (longest - len(r['prompt'])) + [1] * len(r['prompt']) for r in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=max(r['max_tokens'] for r in batch), eos_token_id=None,
                                 pad_token_id=0)
        return [row[longest:longest + r['max_tokens']] for row, r in zip(out.tolist(), batch)]

    generate([{'prompt': requests[0]['prompt'][:16], 'max_tokens': 4}])  # warm-up
    tokens = []
    t0 = time.perf_counter()
    for first in range(0, len(requests), args.batch):
        tokens.extend(generate(requests[first:first + args.batch]))
    seconds = time.perf_counter() - t0
    with open(args.out, 'w') as f:
        json.dump({'seconds': seconds, 'tokens': tokens, 'threads': torch.get_num_threads()}, f)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest='cmd', required=True)
    w = sub.add_parser('workload')
    w.add_argument('out')
    w.add_argument('--requests', type=int, default=256)
    w.add_argument('--seed', type=int, default=7)
    w.add_argument('--vocab', type=int, default=32000)
    w.add_argument('--prompt-min', type=int, default=10)
    w.add_argument('--prompt-max', type=int, default=400)
    w.add_argument('--output-min', type=int, default=16)
    w.add_argument('--output-max', type=int, default=256)
    r = sub.add_parser('run')
    r.add_argument('dir')
    r.add_argument('workload')
    r.add_argument('--batch', type=int, default=16)
    r.add_argument('--threads', type=int, default=2)
    r.add_argument('--out', required=True)
    args = ap.parse_args()
    workload(args) if args.cmd == 'workload' else run(args)


if __name__ == '__main__':
    main()

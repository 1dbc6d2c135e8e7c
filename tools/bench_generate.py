#!/usr/bin/env python3
"""The Python side of tools/bench_generate.sh: transformers and llama.cpp as independent references.

    python3 tools/bench_generate.py make DIR [--hidden 512 --layers 8 --heads 8 --kv-heads 4 --ffn 1408 --vocab 32000]
        builds a random-weight float32 Llama model with transformers and save_pretrained()s it to DIR, plus
        DIR/bench_prompts.json: 8 prompts of different lengths (0-based token ids, seeded)
    python3 tools/bench_generate.py gguf DIR OUT.gguf --dtype f32|bf16
        writes DIR's weights as a llama.cpp GGUF file with the gguf package (needs no tokenizer: the
        vocabulary is placeholder pieces, since the benchmark feeds token ids)
    python3 tools/bench_generate.py bench DIR --pmp PMP --new N --rounds R --threads T --batches 1,8 --dtypes f32,bf16
        the benchmark proper: transformers, pmp (PMP tools/bench_generate.lua DIR, a server on a pipe) and
        llama.cpp (llama-cpp-python's low-level API on DIR/model-<dtype>.gguf, when importable) generate
        greedily from the same prompt tokens, in alternating rounds; prints prefill and decode tokens/s,
        pmp's ratios to the others, and whether the greedy tokens equal transformers'.

Prefill and decode are timed the same way for all three programs: a generate call that makes one token
(prefill plus one greedy choice) and one that makes N; prefill tokens/s = prompt tokens / the first call's
seconds, decode tokens/s = batch * (N - 1) / (the second's seconds - the first's). Medians over the rounds.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

PROMPT_LENGTHS = [37, 12, 58, 25, 44, 19, 50, 31]
TORCH_DTYPES = {'f32': torch.float32, 'bf16': torch.bfloat16}


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


# ---- GGUF conversion ----

def rotary_pairs_interleaved(w, heads):
    """Reorders the rows of a q or k projection from Hugging Face's rotary layout (each head's first half
    pairs with its second half) to llama.cpp's (adjacent rows pair), which GGUF Llama files use."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(rows, -1)


def gguf(args):
    import gguf as gg
    from safetensors.torch import load_file
    with open(os.path.join(args.dir, 'config.json')) as f:
        cfg = json.load(f)
    if cfg.get('architectures') != ['LlamaForCausalLM']:
        sys.exit(f'bench_generate gguf: {args.dir}/config.json is not a LlamaForCausalLM')
    weights = load_file(os.path.join(args.dir, 'model.safetensors'))
    heads, kv_heads, hidden = cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['hidden_size']
    vocab = cfg['vocab_size']
    rope = cfg.get('rope_parameters') or {}
    if rope.get('rope_type', 'default') != 'default':
        sys.exit(f"bench_generate gguf: rope_type {rope['rope_type']} is not converted")

    tmp = args.out + '.tmp'
    w = gg.GGUFWriter(tmp, 'llama')
    w.add_name('bench_generate')
    w.add_context_length(cfg['max_position_embeddings'])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg['num_hidden_layers'])
    w.add_feed_forward_length(cfg['intermediate_size'])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(rope.get('rope_theta', 10000.0))
    w.add_layer_norm_rms_eps(cfg['rms_norm_eps'])
    w.add_vocab_size(vocab)
    w.add_file_type(gg.LlamaFileType.ALL_F32 if args.dtype == 'f32' else gg.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model('llama')
    w.add_token_list([f'<t{i}>'.encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gg.TokenType.NORMAL] * vocab)

    def add(name, t):
        t = t.to(torch.float32)
        if args.dtype == 'bf16' and t.dim() == 2:  # 1-d norm weights stay f32, as llama.cpp's converter keeps them
            w.add_tensor(name, t.to(torch.bfloat16).view(torch.uint16).numpy(), raw_dtype=gg.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, t.numpy())

    add('token_embd.weight', weights['model.embed_tokens.weight'])
    add('output_norm.weight', weights['model.norm.weight'])
    add('output.weight', weights.get('lm_head.weight', weights['model.embed_tokens.weight']))
    for i in range(cfg['num_hidden_layers']):
        p = f'model.layers.{i}.'
        add(f'blk.{i}.attn_norm.weight', weights[p + 'input_layernorm.weight'])
        add(f'blk.{i}.attn_q.weight', rotary_pairs_interleaved(weights[p + 'self_attn.q_proj.weight'], heads))
        add(f'blk.{i}.attn_k.weight', rotary_pairs_interleaved(weights[p + 'self_attn.k_proj.weight'], kv_heads))
        add(f'blk.{i}.attn_v.weight', weights[p + 'self_attn.v_proj.weight'])
        add(f'blk.{i}.attn_output.weight', weights[p + 'self_attn.o_proj.weight'])
        add(f'blk.{i}.ffn_norm.weight', weights[p + 'post_attention_layernorm.weight'])
        add(f'blk.{i}.ffn_gate.weight', weights[p + 'mlp.gate_proj.weight'])
        add(f'blk.{i}.ffn_up.weight', weights[p + 'mlp.up_proj.weight'])
        add(f'blk.{i}.ffn_down.weight', weights[p + 'mlp.down_proj.weight'])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, args.out)


# ---- the three programs: each has generate(prompts, new) -> (seconds, tokens per row) ----

class Transformers:
    name = 'transformers'

    def __init__(self, model_dir, dtype, threads):
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype]).eval()
        self.min_gap = math.inf

    def generate(self, prompts, new, scores=False):
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                      max_new_tokens=new, eos_token_id=None, pad_token_id=0,
                                      output_scores=scores, return_dict_in_generate=True)
        seconds = time.perf_counter() - t0
        if scores:  # the smallest top-1/top-2 logit gap met, to judge greedy mismatches
            for s in out.scores:
                top = s.float().topk(2, dim=-1).values
                self.min_gap = min(self.min_gap, (top[:, 0] - top[:, 1]).min().item())
        return seconds, out.sequences[:, longest:].tolist()

    def close(self):
        self.model = None


class Pmp:
    """pmp tools/bench_generate.lua as a server: one JSON request per line on its stdin, one reply per line."""
    name = 'pmp'

    def __init__(self, pmp, root, model_dir, dtype, threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([pmp, 'tools/bench_generate.lua', model_dir, dtype], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def generate(self, prompts, new):
        self.proc.stdin.write(json.dumps({'prompts': prompts, 'new': new}) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f'bench_generate: pmp exited with status {self.proc.wait()}')
        reply = json.loads(line)
        return reply['seconds'], reply['tokens']

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: one context with a sequence per prompt, so a batch of B
    prompts decodes as B parallel sequences (one llama_decode call per step for all of them)."""
    name = 'llama.cpp'

    def __init__(self, gguf_path, dtype, threads, max_batch, max_tokens):
        import gguf
        import llama_cpp as lc
        import numpy as np
        self.lc, self.np = lc, np
        self.quiet = lc.llama_log_callback(lambda level, text, data: None)   # kept: C holds the pointer
        lc.llama_log_set(self.quiet, None)
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(gguf_path.encode(), lc.llama_model_default_params())
        if not self.model:
            sys.exit(f'bench_generate: llama.cpp could not load {gguf_path}')
        cp = lc.llama_context_default_params()
        cp.n_seq_max = max_batch
        cp.n_ctx = max_batch * max_tokens
        cp.n_batch = cp.n_ubatch = max_batch * max_tokens
        cp.n_threads = cp.n_threads_batch = threads
        # the KV cache in the weights' dtype, as pmp and transformers keep it (llama.cpp's default is f16)
        cp.type_k = cp.type_v = int(gguf.GGMLQuantizationType.F32 if dtype == 'f32' else gguf.GGMLQuantizationType.BF16)
        cp.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            sys.exit(f'bench_generate: llama.cpp could not create a context for {gguf_path}')
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(cp.n_batch, 0, 1)

    def _decode(self, entries):
        """entries: (token, position, sequence, wants logits); returns the logits rows asked for, in order."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, logits
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            sys.exit(f'bench_generate: llama_decode returned {rc}')
        return [self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
                for i, e in enumerate(entries) if e[3]]

    def generate(self, prompts, new):
        t0 = time.perf_counter()
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        entries = [(tok, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, tok in enumerate(p)]
        logits = self._decode(entries)
        tokens = [[] for _ in prompts]
        for step in range(new):
            chosen = [int(row.argmax()) for row in logits]
            for s, t in enumerate(chosen):
                tokens[s].append(t)
            if step == new - 1:
                break
            logits = self._decode([(t, len(prompts[s]) + step, s, True) for s, t in enumerate(chosen)])
        return time.perf_counter() - t0, tokens

    def close(self):
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def llama_cpp_missing():
    try:
        import llama_cpp  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        return f'llama.cpp column skipped: {e.name} is not importable (pip install llama-cpp-python gguf)'
    return None


# ---- the benchmark ----

def first_difference(a, b):
    bad = [f'row {i + 1} from token {next(k for k in range(len(x)) if x[k] != y[k]) + 1}'
           for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return 'identical' if not bad else 'DIFFERENT: ' + ', '.join(bad)


def bench(args):
    with open(os.path.join(args.dir, 'bench_prompts.json')) as f:
        all_prompts = json.load(f)
    batches = [int(b) for b in args.batches.split(',')]
    dtypes = args.dtypes.split(',')
    for b in batches:
        if not 1 <= b <= len(all_prompts):
            sys.exit(f'bench_generate: --batches {b} is outside 1..{len(all_prompts)} (the prompts in bench_prompts.json)')
    for d in dtypes:
        if d not in TORCH_DTYPES:
            sys.exit(f'bench_generate: --dtypes {d} is not f32 or bf16')
    if args.new < 2:
        sys.exit('bench_generate: --new must be at least 2 (decode is timed from the second token)')
    missing = llama_cpp_missing()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    print(f'prefill tok/s = prompt tokens / seconds of a 1-token generate; decode tok/s = batch*{args.new - 1} / '
          f'(seconds of a {args.new}-token generate - that);')
    print(f'  medians of {args.rounds} alternating rounds after a warm-up; {args.threads} threads; '
          'pmp/x = pmp tok/s over x tok/s (above 1: pmp faster)')
    if missing:
        print(missing)
    header = f"{'dtype':<5} {'batch':>5}  {'program':<13}{'prefill tok/s':>14}{'decode tok/s':>14}{'pmp/x prefill':>15}{'pmp/x decode':>14}  greedy tokens vs transformers"
    print(header)
    for dtype in dtypes:
        programs = [Transformers(args.dir, dtype, args.threads),
                    Pmp(args.pmp, root, args.dir, dtype, args.threads)]
        gguf_path = os.path.join(args.dir, f'model-{dtype}.gguf')
        if not missing:
            longest = max(len(p) for p in all_prompts) + args.new
            programs.append(LlamaCpp(gguf_path, dtype, args.threads, max(batches), longest))
        for batch in batches:
            prompts = all_prompts[:batch]
            prompt_tokens = sum(len(p) for p in prompts)
            full, prefill, tokens = {}, {}, {}
            for p in programs:  # warm-up, and the tokens every timed run must repeat
                if p.name == 'transformers':
                    _, tokens[p.name] = p.generate(prompts, args.new, scores=True)
                else:
                    _, tokens[p.name] = p.generate(prompts, args.new)
                full[p.name], prefill[p.name] = [], []
            for r in range(args.rounds):
                order = programs[r % len(programs):] + programs[:r % len(programs)]
                for p in order:
                    seconds, toks = p.generate(prompts, args.new)
                    if toks != tokens[p.name]:
                        sys.exit(f'bench_generate: {p.name} gave different greedy tokens in round {r + 1}')
                    full[p.name].append(seconds)
                    prefill[p.name].append(p.generate(prompts, 1)[0])
            speed = {}
            for p in programs:
                pre, whole = statistics.median(prefill[p.name]), statistics.median(full[p.name])
                speed[p.name] = (prompt_tokens / pre, batch * (args.new - 1) / (whole - pre) if whole > pre else math.nan)
            for p in programs:
                pre, dec = speed[p.name]
                ours = speed['pmp']
                check = (f'reference (smallest top-2 logit gap {programs[0].min_gap:.3g})' if p.name == 'transformers'
                         else first_difference(tokens[p.name], tokens['transformers']))
                print(f'{dtype:<5} {batch:>5}  {p.name:<13}{pre:>14.1f}{dec:>14.1f}{ours[0] / pre:>15.2f}{ours[1] / dec:>14.2f}  {check}')
            sys.stdout.flush()
        for p in programs:
            p.close()


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
    c = sub.add_parser('gguf')
    c.add_argument('dir')
    c.add_argument('out')
    c.add_argument('--dtype', choices=sorted(TORCH_DTYPES), required=True)
    b = sub.add_parser('bench')
    b.add_argument('dir')
    b.add_argument('--pmp', required=True)
    b.add_argument('--new', type=int, default=64)
    b.add_argument('--rounds', type=int, default=3)
    b.add_argument('--threads', type=int, default=2)
    b.add_argument('--batches', default='1,8')
    b.add_argument('--dtypes', default='f32,bf16')
    args = ap.parse_args()
    {'make': make, 'gguf': gguf, 'bench': bench}[args.cmd](args)


if __name__ == '__main__':
    main()

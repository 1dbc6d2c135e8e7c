"""PyTorch side of tools/bench_moe.lua: forward + backward of one MoE layer and of the dense SwiGLU MLP
with the same active parameters, on the same token count and thread count, on CPU in float32.

The MoE layer is what Megatron-Core's MoELayer computes with a softmax top-k router (top-k on the
logits, the chosen softmax probabilities renormalised) and SequentialMLP experts: the (token, choice)
pairs sorted by expert (a stable argsort), each expert's rows through its SwiGLU MLP in a loop, the
outputs weighted by their probabilities and summed back into token order (index_add_). That is the
grouped loop a PyTorch training of these models runs without a grouped-GEMM kernel.

    python3 tools/bench_moe.py --hidden 512 --experts 8 --topk 2 --ffn 704 --tokens 1024 --reps 5 --threads 2

Prints one line: RESULT <moe seconds> <dense seconds> <moe cpu seconds> <dense cpu seconds> (each the
best of --reps after one warm-up; cpu: the process's CPU time, all threads).
"""
import argparse
import time

import torch
import torch.nn.functional as F


def swiglu(x, fc1, fc2):
    gate, up = (x @ fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ fc2.t()


def moe_forward(x, router, fc1, fc2, topk):
    logits = x @ router.t()
    scores = logits.softmax(-1)
    chosen = logits.topk(topk, dim=-1).indices
    probs = scores.gather(1, chosen)
    probs = probs / probs.sum(-1, keepdim=True)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = order // topk
    counts = torch.bincount(flat, minlength=router.shape[0]).tolist()
    permuted = x.index_select(0, rows)
    parts, start = [], 0
    for e, n in enumerate(counts):
        if n > 0:
            parts.append(swiglu(permuted[start:start + n], fc1[e], fc2[e]))
            start += n
    y = torch.cat(parts) * probs.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, rows, y)


def best_time(step, reps):
    step()
    best, best_cpu = float('inf'), float('inf')
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--hidden', type=int, required=True)
    p.add_argument('--experts', type=int, required=True)
    p.add_argument('--topk', type=int, required=True)
    p.add_argument('--ffn', type=int, required=True)
    p.add_argument('--tokens', type=int, required=True)
    p.add_argument('--reps', type=int, required=True)
    p.add_argument('--threads', type=int, required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    H, E, k, Fe = a.hidden, a.experts, a.topk, a.ffn

    def param(*shape):
        return (torch.randn(*shape) * 0.02).requires_grad_()

    x = torch.randn(a.tokens, H).requires_grad_()
    router, fc1, fc2 = param(E, H), param(E, 2 * Fe, H), param(E, H, Fe)
    dense1, dense2 = param(2 * k * Fe, H), param(H, k * Fe)

    def moe_step():
        for t in (x, router, fc1, fc2):
            t.grad = None
        moe_forward(x, router, fc1, fc2, k).sum().backward()

    def dense_step():
        for t in (x, dense1, dense2):
            t.grad = None
        swiglu(x, dense1, dense2).sum().backward()

    moe, dense = best_time(moe_step, a.reps), best_time(dense_step, a.reps)
    print('RESULT %.6f %.6f %.6f %.6f' % (moe[0], dense[0], moe[1], dense[1]))


if __name__ == '__main__':
    main()

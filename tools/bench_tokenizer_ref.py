#!/usr/bin/env python3
"""Reference speed for tools/bench_tokenizer.lua: the Python `tokenizers` package encoding a text file
on one thread. Prints one line: `tokens=<n> seconds=<best of repeats> mb_per_s=<x>`.

    RAYON_NUM_THREADS=1 python3 tools/bench_tokenizer_ref.py TOKENIZER_DIR TEXT_FILE [whole|lines] [repeats]
"""
import os
import sys
import time

os.environ.setdefault('RAYON_NUM_THREADS', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
from tokenizers import Tokenizer  # noqa: E402


def main():
    tok_dir, path = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else 'whole'
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    tok = Tokenizer.from_file(os.path.join(tok_dir, 'tokenizer.json'))
    with open(path, 'rb') as f:
        data = f.read()
    text = data.decode('utf-8')
    pieces = [text] if mode == 'whole' else text.splitlines(keepends=True)
    best, count = None, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = 0
        for piece in pieces:   # encode, not encode_batch: one thread, like pmp
            count += len(tok.encode(piece, add_special_tokens=False).ids)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    print('tokens=%d seconds=%.6f mb_per_s=%.3f' % (count, best, len(data) / best / 1e6))


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Reference speed for tools/bench_tokenizer.lua: the Python package of each tokenizer kind encoding a
text file on one thread, without special tokens. Prints one line:
`reference=<package> tokens=<n> seconds=<best of repeats> mb_per_s=<x>`.

    RAYON_NUM_THREADS=1 python3 tools/bench_tokenizer_ref.py PATH TEXT_FILE [whole|lines] [repeats]

PATH: a directory with tokenizer.json (`tokenizers`), a SentencePiece .model file (`sentencepiece`),
or a tiktoken ranks file (`tiktoken`, with Qwen 1's regex and special tokens, after NFC as Qwen does).
"""
import base64
import os
import sys
import time
import unicodedata

os.environ.setdefault('RAYON_NUM_THREADS', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] + ['<|extra_%d|>' % i for i in range(205)]


def encoder(path):
    """(package name, function text -> number of tokens)."""
    if path.endswith('.tiktoken'):
        import tiktoken
        with open(path, 'rb') as f:
            ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f.read().splitlines() if line)}
        specials = {t: 151643 + i for i, t in enumerate(QWEN_SPECIALS)}
        enc = tiktoken.Encoding('qwen', pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return 'tiktoken', lambda text: len(enc.encode(unicodedata.normalize('NFC', text), allowed_special='all'))
    if path.endswith('.model'):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=path)
        return 'sentencepiece', lambda text: len(sp.encode(text))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(path, 'tokenizer.json'))
    return 'tokenizers', lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def main():
    path, data_path = sys.argv[1], sys.argv[2]
    mode = sys.argv[3] if len(sys.argv) > 3 else 'whole'
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    name, count_tokens = encoder(path)
    with open(data_path, 'rb') as f:
        data = f.read()
    text = data.decode('utf-8')
    pieces = [text] if mode == 'whole' else text.splitlines(keepends=True)
    best, count = None, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = 0
        for piece in pieces:   # one text at a time, one thread, like pmp
            count += count_tokens(piece)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    print('reference=%s tokens=%d seconds=%.6f mb_per_s=%.3f' % (name, count, best, len(data) / best / 1e6))


if __name__ == '__main__':
    main()

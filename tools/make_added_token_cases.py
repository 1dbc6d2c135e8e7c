#!/usr/bin/env python3
"""Writes spec/fixtures/tokenizer_added_tokens.json: a tiny BPE tokenizer whose added tokens are
prefixes of one another ('[A]' and '[A][B]', '<s>' and '<s><s>') or overlap the model's merges ('bc'),
and the ids the `tokenizers` package gives for texts where leftmost-longest matching decides.

Usage: python3 tools/make_added_token_cases.py   (needs tokenizers from PyPI)
"""
import json
import os

import tokenizers
from tokenizers import AddedToken, Tokenizer, models

OUT = os.path.join(os.path.dirname(__file__), '..', 'spec', 'fixtures', 'tokenizer_added_tokens.json')

TEXTS = ['[A][B]ab', 'c[A][B][A]c', '<s><s><s>', 'ab[A][B]c[A]', 'abcc', '[A][A][B]', '[A][B<s>]']


def main():
    vocab = {'a': 0, 'b': 1, 'c': 2, '[': 3, ']': 4, 'A': 5, 'B': 6, 'ab': 7}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[('a', 'b')]))
    tok.add_tokens([AddedToken('[A]', normalized=False), AddedToken('[A][B]', normalized=False),
                    AddedToken('bc', normalized=False)])
    tok.add_special_tokens([AddedToken('<s>'), AddedToken('<s><s>')])
    cases = [{'text': text, 'ids': tok.encode(text).ids} for text in TEXTS]
    fixture = {'written_by': f'tools/make_added_token_cases.py with tokenizers {tokenizers.__version__}',
               'tokenizer': json.loads(tok.to_str()), 'cases': cases}
    with open(OUT + '.tmp', 'w') as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write('\n')
    os.replace(OUT + '.tmp', OUT)


if __name__ == '__main__':
    main()

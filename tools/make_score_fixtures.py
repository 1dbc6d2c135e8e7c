#!/usr/bin/env python3
"""Builds tiny Hugging Face reward models (*ForSequenceClassification, num_labels=1) under
spec/fixtures/hf_score/ (run from the repo root).

    pip install transformers torch safetensors
    python3 tools/make_score_fixtures.py [--out spec/fixtures/hf_score]
    python3 tools/make_score_fixtures.py --verify-export DIR   # DIR/<name> written by pmp's save_pretrained

Each model: the architecture of tools/make_hf_fixtures.py's model of the same family (hidden 32, 2 layers,
vocabulary 150), random seeded weights, pad_token_id 0, saved in float32 with save_pretrained; plus
<name>/reference.json: three rows of ids, right-padded with 0 to different lengths, and the scores
transformers returns for them (its `logits`, [3, 1]: the score head at each row's last non-pad token),
and the score head's values at every position of the rows (`values`, [3, T]).
--verify-export loads DIR/<name> with transformers and checks its scores against the reference.
"""
import argparse
import json
import os
import shutil
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_hf_fixtures import BASE, MODELS, VOCAB, randomize  # noqa: E402

FAMILIES = {
    'llama': 'LlamaForSequenceClassification',
    'mistral': 'MistralForSequenceClassification',
    'qwen2_tied': 'Qwen2ForSequenceClassification',
    'qwen3': 'Qwen3ForSequenceClassification',
}
T = 12
LENGTHS = [12, 7, 10]


def inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), T), generator=g)
    for row, n in enumerate(LENGTHS):
        ids[row, n:] = 0
    return ids


def scores(model, ids):
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        values = model.score(model.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state)
    return logits, values[..., 0]


def build(name, out_dir):
    cls_name, kwargs, _ = MODELS[name]
    cfg = getattr(transformers, cls_name)(**BASE, **kwargs, num_labels=1, pad_token_id=0)
    seed = 50 + sorted(FAMILIES).index(name)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[name])(cfg).to(torch.float32)
    randomize(model, seed)
    path = os.path.join(out_dir, name)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    ids = inputs()
    logits, values = scores(model, ids)
    with open(os.path.join(path, 'reference.json'), 'w') as f:
        json.dump({'ids': ids.tolist(), 'lengths': LENGTHS, 'scores': logits[:, 0].tolist(),
                   'values': values.tolist()}, f)
    print(f'{name}: scores {[round(s, 4) for s in logits[:, 0].tolist()]}')


def verify(name, out_dir, export_dir):
    with open(os.path.join(out_dir, name, 'reference.json')) as f:
        ref = json.load(f)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(export_dir, name), dtype=torch.float32)
    assert type(model).__name__ == FAMILIES[name], type(model).__name__
    logits, _ = scores(model, torch.tensor(ref['ids']))
    err = (logits[:, 0] - torch.tensor(ref['scores'])).abs().max().item()
    assert err < 1e-4, f'{name}: scores differ by {err}'
    print(f'{name}: transformers reads the export, scores within {err:.2e}')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default='spec/fixtures/hf_score')
    ap.add_argument('--verify-export')
    args = ap.parse_args()
    for name in sorted(FAMILIES):
        if args.verify_export:
            verify(name, args.out, args.verify_export)
        else:
            os.makedirs(args.out, exist_ok=True)
            build(name, args.out)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Writes spec/fixtures/sampling/cases.json: the exact next-token distributions that transformers'
logits processors define for fixed logits, per combination of temperature, top-k, top-p and
repetition penalty. spec/sampling_spec.lua draws many seeded samples through pmp.generate and
compares the empirical frequencies with these; spec/sample_op_spec.lua does the same with pmp.sample
directly, in f64, f32 and bf16, and also checks:
- `ties`: logits with repeated values, where top-k keeps every token tied with the k-th largest;
- `wide`: 256 distinct logits, where the top-p nucleus runs hundreds of tokens deep;
- `argmax`: rows with ties (exact, and made by rounding to bf16) and NaN (written as null), with
  torch.argmax's choice in f32 and in bf16 (greedy decoding's rule).
All logits are exact in bf16, so the distributions hold for f64, f32 and bf16 logits alike.

The processors are chained in the order transformers' generate() builds them when sampling: the
repetition penalty first, then temperature, top-k and top-p (GenerationMixin._get_logits_processor).

Each case keeps every top-p boundary at least MARGIN away from a cumulative mass, so a nucleus cut that
is off by one token, or taken at the wrong temperature, moves a whole token's probability.

Usage: python3 tools/make_sampling_fixtures.py   (needs torch and transformers from PyPI)
"""
import json
import os

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

OUT = os.path.join(os.path.dirname(__file__), '..', 'spec', 'fixtures', 'sampling', 'cases.json')
MARGIN = 0.02

# Ten logits, distinct and not sorted, both signs (the repetition penalty treats the signs differently).
LOGITS = [1.25, -0.5, 2.0, 0.75, -1.5, 1.75, 0.0, -0.25, 2.5, 0.5]
PROMPT = [3, 6, 1, 3, 9]   # ids already seen: 3 twice (penalised once), 1 negative, 6 zero, 9 positive

CASES = [
    dict(name='temperature 1', temperature=1.0),
    dict(name='temperature 0.6', temperature=0.6),
    dict(name='temperature 1.8', temperature=1.8),
    dict(name='top_k 6', temperature=1.0, top_k=6),
    dict(name='top_p 0.77', temperature=1.0, top_p=0.77),
    dict(name='top_p 0.85 at temperature 0.5', temperature=0.5, top_p=0.85),
    dict(name='top_p 0.7 at temperature 2', temperature=2.0, top_p=0.7),
    dict(name='top_k 6 and top_p 0.7 at temperature 1.3', temperature=1.3, top_k=6, top_p=0.7),
    dict(name='repetition penalty 1.5', temperature=1.0, repetition_penalty=1.5),
    dict(name='repetition penalty 2, temperature 0.8, top_k 5, top_p 0.85', temperature=0.8,
         repetition_penalty=2.0, top_k=5, top_p=0.85),
]


# Repeated values: top_k 2 keeps the three 2.0s, top_k 4 the three 2.0s and the three 1.0s.
TIES_LOGITS = [1.0, 2.0, 2.0, 0.5, 2.0, 1.0, -1.0, 1.0]
TIES_CASES = [
    dict(name='ties: top_k 2 keeps all tokens tied with the 2nd largest', temperature=1.0, top_k=2),
    dict(name='ties: top_k 4 at temperature 0.7', temperature=0.7, top_k=4),
]

# Distinct logits from 0 down to -255/64 in steps of 1/64, shuffled: the nucleus holds a hundred tokens
# or more, each with well under 1% of the mass, so its boundary sits far below the peak.
WIDE_LOGITS = [-((v * 37) % 256) / 64 for v in range(256)]
WIDE_CASES = [
    dict(name='wide: top_p 0.9', temperature=1.0, top_p=0.9),
    dict(name='wide: top_p 0.97 at temperature 0.8', temperature=0.8, top_p=0.97),
    dict(name='wide: top_k 200 and top_p 0.95 at temperature 1.5', temperature=1.5, top_k=200, top_p=0.95),
]
# the wide nucleus' tokens are too small for MARGIN: its cumulative masses stay this far from top_p
WIDE_MARGIN = 1e-6

NAN = float('nan')
ARGMAX_ROWS = [
    [0.5, 3.0, -1.0, 3.0, 2.0],                # exact tie: the first
    [1.0, 1.001, 1.002, 0.25, -2.0],            # distinct in f32, one value in bf16
    [-0.5, NAN, 4.0, NAN, 1.0],                 # NaN counts as the largest: the first NaN
    [NAN, 7.0, 1.0, 2.0, 3.0],
    [-3.0, -3.0, -3.0, -3.0, -3.0],             # all equal
]


def processors(case, filtering=True):
    chain = LogitsProcessorList()
    if case.get('repetition_penalty', 1.0) != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(case['repetition_penalty']))
    chain.append(TemperatureLogitsWarper(case['temperature']))
    if not filtering:
        return chain
    if case.get('top_k'):
        chain.append(TopKLogitsWarper(case['top_k']))
    if case.get('top_p', 1.0) < 1.0:
        chain.append(TopPLogitsWarper(case['top_p']))
    return chain


def check_margin(case, scores, margin):
    """Every cumulative mass of the distribution top-p cuts must stay margin away from top_p."""
    if case.get('top_p', 1.0) >= 1.0:
        return
    probs = torch.softmax(scores, -1).sort(descending=True).values
    for mass in probs.cumsum(0).tolist():
        assert abs(mass - case['top_p']) > margin, f"{case['name']}: a cumulative mass {mass} sits on top_p"


def distributions(logits, prompt_ids, case_list, margin):
    prompt = torch.tensor([prompt_ids], dtype=torch.long)
    cases = []
    for case in case_list:
        scores = torch.tensor([logits], dtype=torch.float64)
        before_top_p = scores.clone()
        for processor in processors(case):
            if isinstance(processor, TopPLogitsWarper):
                before_top_p = scores.clone()
            scores = processor(prompt, scores)
        check_margin(case, before_top_p[0], margin)
        probs = torch.softmax(scores, -1)[0]
        # what pmp.generate reports as a sampled token's log-prob: penalised, temperature-scaled, unfiltered
        scaled = processors(case, filtering=False)(prompt, torch.tensor([logits], dtype=torch.float64))
        logprobs = torch.log_softmax(scaled, -1)[0]
        cases.append(dict(case, probs=probs.tolist(), logprobs=logprobs.tolist()))
    return cases


def exact_in_bf16(values):
    for v in values:
        assert v != v or torch.tensor(v, dtype=torch.bfloat16).item() == v, f'{v} is not a bf16 value'


def main():
    exact_in_bf16(LOGITS + TIES_LOGITS + WIDE_LOGITS)
    rows = torch.tensor(ARGMAX_ROWS, dtype=torch.float32)
    fixture = dict(
        logits=LOGITS, prompt=PROMPT, cases=distributions(LOGITS, PROMPT, CASES, MARGIN),
        ties=dict(logits=TIES_LOGITS, cases=distributions(TIES_LOGITS, [], TIES_CASES, MARGIN)),
        wide=dict(logits=WIDE_LOGITS, cases=distributions(WIDE_LOGITS, [], WIDE_CASES, WIDE_MARGIN)),
        argmax=dict(rows=[[None if v != v else v for v in row] for row in ARGMAX_ROWS],
                    f32=rows.argmax(-1).tolist(), bf16=rows.bfloat16().argmax(-1).tolist()))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + '.tmp', 'w') as f:
        json.dump(fixture, f, indent=1)
        f.write('\n')
    os.replace(OUT + '.tmp', OUT)


if __name__ == '__main__':
    main()

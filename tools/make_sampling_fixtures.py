#!/usr/bin/env python3
"""Writes spec/fixtures/sampling/cases.json: the exact next-token distributions that transformers'
logits processors define for fixed logits, per combination of temperature, top-k, top-p and
repetition penalty. spec/sampling_spec.lua draws many seeded samples through pmp.generate and
compares the empirical frequencies with these.

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


def check_margin(case, scores):
    """Every cumulative mass of the distribution top-p cuts must stay MARGIN away from top_p."""
    if case.get('top_p', 1.0) >= 1.0:
        return
    probs = torch.softmax(scores, -1).sort(descending=True).values
    for mass in probs.cumsum(0).tolist():
        assert abs(mass - case['top_p']) > MARGIN, f"{case['name']}: a cumulative mass {mass} sits on top_p"


def main():
    prompt = torch.tensor([PROMPT])
    cases = []
    for case in CASES:
        scores = torch.tensor([LOGITS], dtype=torch.float64)
        before_top_p = scores.clone()
        for processor in processors(case):
            if isinstance(processor, TopPLogitsWarper):
                before_top_p = scores.clone()
            scores = processor(prompt, scores)
        check_margin(case, before_top_p[0])
        probs = torch.softmax(scores, -1)[0]
        # what pmp.generate reports as a sampled token's log-prob: penalised, temperature-scaled, unfiltered
        scaled = processors(case, filtering=False)(prompt, torch.tensor([LOGITS], dtype=torch.float64))
        logprobs = torch.log_softmax(scaled, -1)[0]
        cases.append(dict(case, probs=probs.tolist(), logprobs=logprobs.tolist()))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + '.tmp', 'w') as f:
        json.dump(dict(logits=LOGITS, prompt=PROMPT, cases=cases), f, indent=1)
        f.write('\n')
    os.replace(OUT + '.tmp', OUT)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Writes spec/fixtures/rl/trl_reference.json: values of TRL's own implementations for pmp.rl's specs.

    pip install torch
    pip install --no-deps --target /tmp/trl011 trl==0.11.4
    python3 tools/make_rl_fixtures.py --trl-path /tmp/trl011 [--out spec/fixtures/rl/trl_reference.json]

TRL 0.11.4 is the last release with a standalone `masked_whiten` (trl.core) and `DPOTrainer.dpo_loss`
(sigmoid with cDPO label smoothing, IPO, hinge); newer releases fold both into their trainers. Its
trainer module no longer imports against current transformers, so the script takes the `dpo_loss`
method's source out of TRL's file and runs it as TRL wrote it, on a stand-in `self` that holds only
the attributes the method reads (beta, label_smoothing, loss_type, reference_free, f-divergence type).
Inputs are seeded random float64 tensors; the fixture holds inputs and outputs.
"""
import argparse
import ast
import json
import os
import sys
import types

import torch
import torch.nn.functional as F


class FDivergenceType:  # the enum values dpo_loss compares against (trl.trainer.utils.FDivergenceType)
    REVERSE_KL = types.SimpleNamespace(value='reverse_kl')
    JS_DIVERGENCE = types.SimpleNamespace(value='js_divergence')
    ALPHA_DIVERGENCE = types.SimpleNamespace(value='alpha_divergence')


def trl_dpo_loss(trl_path):
    path = os.path.join(trl_path, 'trl', 'trainer', 'dpo_trainer.py')
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == 'dpo_loss':
            module = ast.Module(body=[node], type_ignores=[])
            namespace = {'torch': torch, 'F': F, 'FDivergenceType': FDivergenceType, 'Tuple': tuple,
                         'FDivergenceConstants': None, 'cap_exp': None}
            exec(compile(module, path, 'exec'), namespace)
            return namespace['dpo_loss']
    raise SystemExit(f'{path} has no dpo_loss')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--trl-path', required=True)
    ap.add_argument('--out', default='spec/fixtures/rl/trl_reference.json')
    args = ap.parse_args()
    sys.path.insert(0, args.trl_path)
    from trl.core import masked_whiten  # noqa: E402
    dpo_loss = trl_dpo_loss(args.trl_path)

    g = torch.Generator().manual_seed(11)
    values = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 1
    mask = (torch.rand(4, 9, generator=g, dtype=torch.float64) > 0.35).double()
    whitened = masked_whiten(values, mask) * mask   # pmp.rl.whiten zeroes what the mask leaves out, as TRL's PPO does after
    out = {'whiten': {'values': values.tolist(), 'mask': mask.tolist(), 'expected': whitened.tolist()}, 'dpo': []}

    logps = [-(torch.rand(6, generator=g, dtype=torch.float64) * 30 + 1) for _ in range(4)]
    for loss_type, beta, smoothing in [('sigmoid', 0.1, 0.0), ('sigmoid', 0.3, 0.15), ('ipo', 0.1, 0.0),
                                       ('ipo', 0.5, 0.0), ('hinge', 0.1, 0.0), ('hinge', 0.05, 0.0)]:
        self = types.SimpleNamespace(accelerator=types.SimpleNamespace(device='cpu'), reference_free=False,
                                     f_divergence_type='reverse_kl', f_divergence_params=None,
                                     loss_type=loss_type, beta=beta, label_smoothing=smoothing)
        losses, chosen, rejected = dpo_loss(self, *logps)
        out['dpo'].append({'loss_type': loss_type, 'beta': beta, 'label_smoothing': smoothing,
                           'policy_chosen': logps[0].tolist(), 'policy_rejected': logps[1].tolist(),
                           'reference_chosen': logps[2].tolist(), 'reference_rejected': logps[3].tolist(),
                           'loss': losses.mean().item(), 'chosen_rewards': chosen.tolist(),
                           'rejected_rewards': rejected.tolist()})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(out, f)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

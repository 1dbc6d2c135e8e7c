"""Megatron-Core (pip install megatron-core) on the CPU as the reference for pmp's Megatron checkpoints.

One process per model-parallel rank under torchrun, gloo process groups, the local layer spec:

  torchrun --nproc-per-node T*P tools/megatron_reference.py write DIR --tp T --pp P
      builds a small GPTModel (seeded random weights, every bias and norm perturbed), writes DIR as
      Megatron-LM's legacy torch checkpoint (iter_0000005/mp_rank_TT[_PPP]/model_optim_rng.pt with
      args), runs the fixed batch through it and writes DIR/reference.json {ids, vocab_size, logits}
  python3 tools/megatron_reference.py shared-storage FILE
      a torch.save state dict whose tensors are views into one storage (bf16: 0, 1/8, 2/8, ...)
  torchrun --nproc-per-node T*P tools/megatron_reference.py read DIR --tp T --pp P
      loads the checkpoint in DIR (torch.load(weights_only=True), load_state_dict(strict=True)) into
      the model of that layout and prints {"logits": ...} of the same batch as JSON
  --format torch_dist (write and read): Megatron-Core's distributed checkpoint instead
      (dist_checkpointing.save / load of model.sharded_state_dict(): iter_NNNNNNN/.metadata,
      __R_N.distcp, common.pt with args, metadata.json), as Megatron-LM's --ckpt-format torch_dist;
      with --non-homogeneous-layers each layer under its own keys (decoder.layers.N....), as Megatron
      saves hybrid and heterogeneous models, instead of stacked under one key per weight
  --train (write): Megatron-Core's optimizer trains the model two steps first; the checkpoint holds
      those weights and the Adam state ('optimizer'), reference.json the loss after a third step
  --variant gelu_bias (write and read): Megatron-LM's default MLP and biases (LayerNorm, erf GELU, a bias
      on every linear layer) instead of the Llama-style model (RMSNorm, SwiGLU, a bias on linear_qkv only)

make_megatron_fixtures.sh writes spec/fixtures/megatron/ with `write`, make_torch_dist_fixtures.sh
spec/fixtures/megatron_torch_dist/ with `write --format torch_dist`; spec/megatron_checkpoint_spec.lua
(PMP_MEGATRON_CHECK=1) has Megatron-Core `read` what pmp wrote. Pipeline stages pass the hidden states
to the next stage with plain gloo send/recv (Megatron's schedules need CUDA streams).
"""
import argparse
import collections
import copy
import contextlib
import json
import os
import random
import sys
import warnings

warnings.filterwarnings('ignore')
import numpy  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint.filesystem as dcp_filesystem  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# Megatron-Core asks CUDA for the current device while building, and its checkpoint writer waits for
# CUDA copies; on the CPU every tensor lives there and nothing runs asynchronously.
torch.cuda.current_device = lambda: 'cpu'
torch.cuda.synchronize = lambda *args, **kwargs: None

from megatron.core import dist_checkpointing, parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel import random as mrandom  # noqa: E402
from megatron.core.transformer.enums import AttnBackend  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

MODEL = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
             kv_channels=8, vocab_size=100, make_vocab_size_divisible_by=32, max_position_embeddings=64,
             rotary_base=10000.0, norm_epsilon=1e-5)
IDS = [[3, 17, 42, 99, 7, 64, 25, 81], [56, 1, 90, 12, 33, 70, 8, 45]]
ITERATION = 5


def padded_vocab(tp):
    multiple = MODEL['make_vocab_size_divisible_by'] * tp
    return -(-MODEL['vocab_size'] // multiple) * multiple


# --variant: the MLP and biases of the model. llama: RMSNorm, SwiGLU, a bias on linear_qkv only (the
# fixtures of every layout); gelu_bias: Megatron-LM's defaults without --swiglu and --disable-bias-linear,
# LayerNorm, the erf GELU (F.gelu, its default activation_func) and a bias on every linear layer.
VARIANTS = {
    'llama': dict(normalization='RMSNorm', gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False),
    'gelu_bias': dict(normalization='LayerNorm', gated_linear_unit=False, activation_func=F.gelu, add_bias_linear=True),
}


def build(tp, pp, variant):
    v = VARIANTS[variant]
    config = TransformerConfig(
        num_layers=MODEL['num_layers'], hidden_size=MODEL['hidden_size'],
        num_attention_heads=MODEL['num_attention_heads'], num_query_groups=MODEL['num_query_groups'],
        ffn_hidden_size=MODEL['ffn_hidden_size'], kv_channels=MODEL['kv_channels'], normalization=v['normalization'],
        layernorm_epsilon=MODEL['norm_epsilon'], gated_linear_unit=v['gated_linear_unit'],
        activation_func=v['activation_func'], add_bias_linear=v['add_bias_linear'], add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        params_dtype=torch.float32, pipeline_dtype=torch.float32)
    spec = get_gpt_layer_local_spec(normalization=v['normalization'])
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=padded_vocab(tp),
                    max_sequence_length=MODEL['max_position_embeddings'],
                    pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(),
                    share_embeddings_and_output_weights=False, position_embedding_type='rope',
                    rotary_base=MODEL['rotary_base'])


def perturb(model, tp_rank, pp_rank):
    """Every parameter gets seeded noise (biases and norms start at 0 and 1): a split parameter's per
    TP rank and stage, a replicated one's per stage only, so TP ranks agree on what they share."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            split = getattr(p, 'tensor_model_parallel', False)
            seed = sum(map(ord, name)) * 131 + pp_rank * 7 + (tp_rank * 1009 if split else 0)
            g = torch.Generator().manual_seed(seed)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def args_of(tp, pp, variant):
    v = VARIANTS[variant]
    return argparse.Namespace(
        num_layers=MODEL['num_layers'], hidden_size=MODEL['hidden_size'], ffn_hidden_size=MODEL['ffn_hidden_size'],
        num_attention_heads=MODEL['num_attention_heads'], group_query_attention=True,
        num_query_groups=MODEL['num_query_groups'], kv_channels=MODEL['kv_channels'],
        max_position_embeddings=MODEL['max_position_embeddings'], seq_length=MODEL['max_position_embeddings'],
        position_embedding_type='rope', rotary_base=int(MODEL['rotary_base']), rotary_percent=1.0,
        normalization=v['normalization'], norm_epsilon=MODEL['norm_epsilon'], swiglu=v['gated_linear_unit'],
        add_bias_linear=v['add_bias_linear'], add_qkv_bias=True, untie_embeddings_and_output_weights=True, padded_vocab_size=padded_vocab(tp),
        vocab_size=None, make_vocab_size_divisible_by=MODEL['make_vocab_size_divisible_by'],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, transformer_impl='local',
        params_dtype=torch.float32, bf16=False, fp16=False, iteration=ITERATION,
        attention_backend=AttnBackend.auto)


def rng_state():
    """What Megatron-LM saves per data-parallel rank: numpy arrays and dtypes, a tuple of ints."""
    return [{'random_rng_state': random.getstate(), 'np_rng_state': numpy.random.get_state(),
             'torch_rng_state': torch.get_rng_state(), 'cuda_rng_state': None, 'rng_tracker_states': {}}]


def forward(model, pp):
    """The logits [batch, seq, vocab_size] on the last stage (None elsewhere)."""
    ids = torch.tensor(IDS)
    b, s = ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    with torch.no_grad():
        if stage > 0:
            hidden = torch.empty(s, b, MODEL['hidden_size'])
            dist.recv(hidden, src=ranks[stage - 1])
            model.set_input_tensor(hidden)
        out = model(ids, position_ids, mask)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=ranks[stage + 1])
            return None
    # the vocabulary is split across TP ranks: gather it, then cut the padding
    tp_group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, out.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)[..., :MODEL['vocab_size']]


def rank_file(root, tp_rank, pp_rank, pp):
    name = f'mp_rank_{tp_rank:02d}' if pp == 1 else f'mp_rank_{tp_rank:02d}_{pp_rank:03d}'
    return os.path.join(root, name, 'model_optim_rng.pt')


def write_shared_storage(path):
    """A state dict whose tensors are views into one storage, as the distributed optimizer's
    contiguous parameter buffer leaves them (offsets in elements, one storage record)."""
    buffer = torch.arange(40, dtype=torch.bfloat16) / 8
    torch.save({'model': collections.OrderedDict([('a.weight', buffer[4:16].view(3, 4)), ('b.bias', buffer[20:25]),
                                                   ('c.weight', buffer[:2])])}, path)


# --train: Megatron-Core's own optimizer (get_megatron_optimizer: torch's AdamW behind FP32Optimizer, its
# parameter groups) takes TRAIN_STEPS steps on TRAIN_IDS, the labels the ids themselves, at a constant rate
# without clipping; the checkpoint then holds its state as Megatron-LM saves it ('optimizer'), and the
# reference the loss of one more step's batch after that step.
ADAM = dict(lr=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8)
TRAIN_IDS = [[[5, 9, 14, 2, 77, 31, 60, 8], [40, 22, 3, 91, 17, 6, 58, 12]],
             [[11, 73, 29, 4, 88, 50, 36, 19], [2, 64, 95, 27, 13, 70, 44, 9]],
             [[30, 7, 82, 15, 55, 1, 68, 23], [93, 38, 10, 61, 26, 84, 47, 5]]]
TRAIN_STEPS = 2


def on_cpu():
    """Megatron-Core's optimizer makes its scalars with device='cuda': make them on the CPU."""
    def make(factory):
        def wrapped(*args, **kwargs):
            if str(kwargs.get('device', 'cpu')).startswith('cuda'):
                kwargs['device'] = 'cpu'
            return factory(*args, **kwargs)
        return wrapped
    for name in ('tensor', 'zeros', 'ones', 'empty', 'full'):
        setattr(torch, name, make(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def train(model):
    """The weights and the optimizer state after TRAIN_STEPS steps, and the reference's fields (the
    logits of the weights saved)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer='adam', clip_grad=0.0, **ADAM), [ddp])
    # Megatron-LM's scheduler sets each group's rate and weight decay (none for biases and norms: wd_mult 0)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=ADAM['lr'], max_lr=ADAM['lr'], min_lr=ADAM['lr'],
                                        lr_warmup_steps=0, lr_decay_steps=10, lr_decay_style='constant',
                                        start_wd=ADAM['weight_decay'], end_wd=ADAM['weight_decay'], wd_incr_steps=10,
                                        wd_incr_style='constant')
    s = len(IDS[0])
    position_ids = torch.arange(s).unsqueeze(0).expand(len(IDS), s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)

    def loss_of(ids):
        ids = torch.tensor(ids)
        return ddp(ids, position_ids, mask, labels=ids).mean()

    def step(ids):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss_of(ids).backward()
        ddp.finish_grad_sync()
        assert optimizer.step()[0]
        scheduler.step(len(ids))

    for k in range(TRAIN_STEPS):
        step(TRAIN_IDS[k])
    # the next step updates the state in place
    state = copy.deepcopy(optimizer.state_dict())
    weights = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
    logits = forward(model, 1).tolist()
    # the names of the parameters in the order of the saved state's indices
    names = {id(p): n.removeprefix('module.') for n, p in ddp.named_parameters()}
    order = [names[id(p)] for group in optimizer.chained_optimizers[0].optimizer.param_groups for p in group['params']]
    step(TRAIN_IDS[TRAIN_STEPS])
    with torch.no_grad():
        next_loss = loss_of(TRAIN_IDS[TRAIN_STEPS]).item()
    return weights, state, {'logits': logits, 'train_ids': TRAIN_IDS, 'train_steps': TRAIN_STEPS, 'adam': ADAM, 'state_order': order,
                   'next_loss': next_loss}


def main():
    if sys.argv[1:2] == ['shared-storage']:
        return write_shared_storage(sys.argv[2])
    parser = argparse.ArgumentParser()
    parser.add_argument('mode', choices=['write', 'read'])
    parser.add_argument('dir')
    parser.add_argument('--tp', type=int, default=1)
    parser.add_argument('--pp', type=int, default=1)
    parser.add_argument('--format', choices=['torch', 'torch_dist'], default='torch')
    parser.add_argument('--non-homogeneous-layers', action='store_true')
    parser.add_argument('--variant', choices=sorted(VARIANTS), default='llama')
    parser.add_argument('--train', action='store_true')
    opts = parser.parse_args()
    dist.init_process_group('gloo')
    parallel_state.initialize_model_parallel(opts.tp, opts.pp)
    # the tracker's fork draws CUDA generators; dropout is off, so it has nothing to do here
    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    torch.manual_seed(1234)
    sharding = {'singleton_local_shards': False, 'non_homogeneous_layers': opts.non_homogeneous_layers}
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = build(opts.tp, opts.pp, opts.variant)
    model.eval()
    if opts.mode == 'write' and opts.format == 'torch_dist':
        # the save id torch draws at random goes into .metadata: fixed, the fixtures regenerate byte for byte
        dcp_filesystem._generate_uuid = lambda: '00000000-0000-0000-0000-000000000000'
        perturb(model, tp_rank, pp_rank)
        root = os.path.join(opts.dir, f'iter_{ITERATION:07d}')
        os.makedirs(root, exist_ok=True)
        args = args_of(opts.tp, opts.pp, opts.variant)
        args.ckpt_format = 'torch_dist'
        # Megatron-LM's training save: the non-sharded entries go to common.pt
        state = {'args': args, 'checkpoint_version': 3.0, 'iteration': ITERATION,
                 'model': model.sharded_state_dict(metadata=sharding)}
        dist_checkpointing.save(state, root)
    elif opts.mode == 'read' and opts.format == 'torch_dist':
        state = dist_checkpointing.load({'model': model.sharded_state_dict(metadata=sharding)},
                                        os.path.join(opts.dir, 'release'))
        model.load_state_dict(state['model'], strict=True)
    elif opts.mode == 'write':
        perturb(model, tp_rank, pp_rank)
        root = os.path.join(opts.dir, f'iter_{ITERATION:07d}')
        path = rank_file(root, tp_rank, pp_rank, opts.pp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        saved = {'args': args_of(opts.tp, opts.pp, opts.variant), 'checkpoint_version': 3.0, 'iteration': ITERATION,
                 'model': model.state_dict(), 'rng_state': rng_state(), 'num_floating_point_operations_so_far': 0}
        if opts.train:
            on_cpu()
            model.train()
            saved['model'], saved['optimizer'], trained = train(model)
            model.eval()
        torch.save(saved, path)
    else:
        # weights_only: pmp's files must need no global beyond torch's own and the Namespace of args
        with torch.serialization.safe_globals([argparse.Namespace]):
            saved = torch.load(rank_file(os.path.join(opts.dir, 'release'), tp_rank, pp_rank, opts.pp),
                               weights_only=True)
        model.load_state_dict(saved['model'], strict=True)
    logits = forward(model, opts.pp)
    if logits is not None and tp_rank == 0:
        out = {'ids': IDS, 'vocab_size': MODEL['vocab_size'], 'logits': logits.tolist()}
        if opts.mode == 'write' and opts.train:
            out.update(trained)
        if opts.mode == 'write':
            with open(os.path.join(opts.dir, 'latest_checkpointed_iteration.txt'), 'w') as f:
                f.write(str(ITERATION))
            with open(os.path.join(opts.dir, 'reference.json'), 'w') as f:
                json.dump(out, f)
        else:
            print(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())

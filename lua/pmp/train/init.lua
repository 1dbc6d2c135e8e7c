--- pmp.train: the pieces training recipes share, so that a recipe reads top to bottom like a plain
--- training loop (recipes/pretrain.lua, recipes/sft.lua):
---   flags        flag sets (model, training, optimizer, precision, parallel, data, checkpoint, logging)
---   parallel     the Megatron layout from the flags, the model split over it, data parallelism
---   model        the GPT of the model flags
---   data         pretraining data from the flags, and each rank's micro batches
---   base_model   the model a fine-tuning run starts from (Hugging Face, pretraining or own checkpoint)
---   chat_data    fine-tuning conversations (jsonl) into samples and micro batches
---   Epochs       a seeded order over items, reshuffled every pass
---   optimizer    AdamW (or the distributed optimizer) and the learning-rate schedule
---   step         zero_grad, forward_backward (incl. pipeline schedules), finish_grads, clip_grads, evaluate
---   throughput   model FLOPs per token and the measured GEMM peak, for MFU
---   Logger       Megatron's log lines, TensorBoard, the profiler, the end-of-run summary
---   Checkpoints  resume, save cadence, --exit-interval, --exit-duration-in-mins and SIGTERM/SIGINT
---   NanGuard     skips (and counts) steps whose gradient is not finite, stops after too many in a row
---   LossScaler   --fp16's loss scaling (Megatron's dynamic or constant scaler) and f32 main gradients
---   lora         LoRA flags, adapters on the model before training, PEFT files after
return {
  flags = require 'pmp.train.flags',
  parallel = require 'pmp.train.parallel',
  model = require 'pmp.train.model',
  data = require 'pmp.train.data',
  base_model = require 'pmp.train.base_model',
  chat_data = require 'pmp.train.chat_data',
  Epochs = require 'pmp.train.epochs',
  optimizer = require 'pmp.train.optimizer',
  step = require 'pmp.train.step',
  throughput = require 'pmp.train.throughput',
  Logger = require 'pmp.train.logger',
  Checkpoints = require 'pmp.train.checkpoints',
  NanGuard = require 'pmp.train.nan_guard',
  LossScaler = require 'pmp.train.loss_scaler',
  lora = require 'pmp.train.lora',
}

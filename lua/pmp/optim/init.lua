-- pmp.optim: optimizers, learning-rate schedules and gradient clipping.
return {
  AdamW = require 'pmp.optim.adamw',
  SGD = require 'pmp.optim.sgd',
  schedule = require 'pmp.optim.schedule',
  clip_grad_norm = require('pmp.optim.clip').clip_grad_norm,
  grad_norm = require('pmp.optim.clip').grad_norm,
}

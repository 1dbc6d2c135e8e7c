--- pmp.nn.functional (also pmp.F): stateless neural-network functions built on tensor ops.
local tensor = require 'pmp.tensor'
local is_tensor = tensor.is_tensor
local wrap = tensor.wrap
local ffi = require 'ffi'
local C = require('pmp.ffi').C

local F = {}

--- F.softmax(x, dim = -1), and likewise log_softmax, relu, silu, gelu, sigmoid, tanh: the tensor methods.
function F.softmax(x, dim) return x:softmax(dim or -1) end
function F.log_softmax(x, dim) return x:log_softmax(dim or -1) end
function F.relu(x) return x:relu() end
function F.silu(x) return x:silu() end
function F.gelu(x, approximate) return x:gelu(approximate) end
function F.sigmoid(x) return x:sigmoid() end
function F.tanh(x) return x:tanh() end

local function shape_string(shape) return '[' .. table.concat(shape, ',') .. ']' end

-- targets [...] for logits [..., C]
local function targets_match(logits, targets)
  if targets.ndim ~= logits.ndim - 1 then return false end
  for k = 0, targets.ndim - 1 do
    if targets.sizes[k] ~= logits.sizes[k] then return false end
  end
  return true
end

--- cross_entropy(logits [..., C], targets [...] holding 0-based class ids,
---               {ignore_index=-100, reduction='mean'|'sum'|'none'})
--- 'mean' averages over the targets that are not ignored, as PyTorch does.
function F.cross_entropy(logits, targets, options)
  options = options or {}
  local ignore_index = options.ignore_index or -100
  local reduction = options.reduction or 'mean'
  if not is_tensor(logits) or not is_tensor(targets) then error('cross_entropy: expects logits and targets tensors', 2) end
  local classes = logits:size(-1)
  if not targets_match(logits.ptr, targets.ptr) then
    error(string.format('cross_entropy: targets of shape %s do not match logits of shape %s',
      shape_string(targets.shape), shape_string(logits.shape)), 2)
  end
  local rows, flat_targets = logits:reshape(-1, classes), targets:reshape(-1)
  local losses = wrap(C.pmp_cross_entropy(rows.ptr, flat_targets.ptr, ignore_index), rows, flat_targets)
  if reduction == 'none' then return losses:view(targets.shape) end
  if reduction == 'sum' then return losses:sum() end
  if reduction ~= 'mean' then error("cross_entropy: reduction must be 'mean', 'sum' or 'none', got " .. tostring(reduction), 2) end
  local counted = targets:ne(ignore_index):sum():item()
  return losses:sum() / counted
end

--- embedding(ids, weight): rows of weight [V, D] picked by 0-based ids of any shape -> [..., D].
function F.embedding(ids, weight)
  if weight.ndim ~= 2 then error('embedding: weight must be [vocab, dim], got ' .. shape_string(weight.shape), 2) end
  local flat = ids:reshape(-1)
  -- The engine checks every id, so the ids' range is only read to word the error when it fails.
  local rows = C.pmp_index_select(weight.ptr, 0, flat.ptr)
  if rows == nil then
    local reason = ffi.string(C.pmp_last_error())
    if ids:numel() > 0 then
      local lowest, highest = ids:min():item(), ids:max():item()
      local vocab = weight:size(1)
      if lowest < 0 or highest >= vocab then
        error(string.format('embedding: token id %d is out of range for a vocabulary of %d',
          lowest < 0 and lowest or highest, vocab), 2)
      end
    end
    error(reason, 0)
  end
  local shape = ids.shape
  shape[#shape + 1] = weight:size(2)
  return wrap(rows):view(shape)
end

--- linear(x, weight [out, in], bias [out] or nil) = x weight^T + bias
function F.linear(x, weight, bias)
  local y = x:matmul(weight:t())
  if bias then y = y + bias end
  return y
end

-- Fused: normalizes in f32 for low-precision inputs and rounds before the weight, as HF's Llama does.
--- rms_norm(x, weight, eps): x / sqrt(mean(x^2) + eps) * weight over the last dim.
function F.rms_norm(x, weight, eps)
  return wrap(C.pmp_rms_norm(x.ptr, weight and weight.ptr, eps or 1e-6))
end

--- Rotary position embedding on x [..., T, D] with cos/sin broadcastable to [..., T, rotary_dim]
--- (rotary_dim <= D; the rest of each head passes through). interleaved rotates adjacent pairs.
function F.rope(x, cos, sin, interleaved)
  return wrap(C.pmp_rope(x.ptr, cos.ptr, sin.ptr, interleaved and 1 or 0))
end

--- silu(gate) * up for x = [gate | up] along the last dim (Megatron's fused linear_fc1 layout).
function F.swiglu(x) return wrap(C.pmp_swiglu(x.ptr)) end

--- q [B, Hq, T, D], k/v [B, Hkv, S, D]; {causal=true, scale=1/sqrt(D), window=0, first_key=nil}.
--- GQA/MQA when Hkv < Hq. first_key: an integer tensor [B]; row b attends only to keys >= first_key[b]
--- (0-based), which is how left-padded batches hide their padding; or [B, T], per query, which is how
--- packed sequences keep each document to itself. alibi_slopes: a float tensor [Hq] adding
--- slope * (key position - query position) to each head's scores (ALiBi); the slopes get no gradient.
--- alibi_hf_falcon_scale: a positive number selecting transformers' Falcon bias instead,
--- bf16(bf16(slope) * bf16(key position - first key of the row)) * alibi_hf_falcon_scale, rounded to q's dtype.
--- dropout: a probability p > 0 drops attention probabilities as Megatron's attention dropout (training
--- only: pass 0 otherwise), through an unfused path that holds the [B, Hq, T, S] probabilities.
-- Megatron's attention dropout: the probabilities, made explicitly (the fused kernels never hold them),
-- dropped with probability p and the rest scaled by 1/(1-p). Causal or not, without first_key,
-- window or ALiBi. GQA: query head h reads key/value group floor(h / (Hq / Hkv)), as the kernels do.
local function attention_with_dropout(q, k, v, p, scale, causal)
  local B, Hq, T, D = q:size(1), q:size(2), q:size(3), q:size(4)
  local Hkv, S = k:size(2), k:size(3)
  if Hkv < Hq then
    local per_group = Hq / Hkv
    k = k:unsqueeze(3):expand(B, Hkv, per_group, S, D):reshape(B, Hq, S, D)
    v = v:unsqueeze(3):expand(B, Hkv, per_group, S, D):reshape(B, Hq, S, D)
  end
  local compute = q.dtype == 'f64' and 'f64' or 'f32'
  local scores = q:to(compute):matmul(k:to(compute):transpose(3, 4)) * scale
  if causal then
    -- the T queries are the last T of the S positions
    local future = tensor.ones({ T, S }, { dtype = compute }):triu(S - T + 1):ne(0)
    scores = scores:masked_fill(future, -math.huge)
  end
  local probs = F.dropout(scores:softmax(-1), p, true)
  return probs:matmul(v:to(compute)):to(q.dtype)
end

function F.attention(q, k, v, options)
  options = options or {}
  local causal = options.causal ~= false
  local p = options.dropout or 0
  if p > 0 then
    if options.first_key or options.alibi_slopes or options.alibi_hf_falcon_scale ~= nil or (options.window or 0) > 0 then
      error('attention: dropout on the probabilities is not supported with first_key, a window or ALiBi', 2)
    end
    return attention_with_dropout(q, k, v, p, options.scale or 1 / math.sqrt(q:size(4)), causal)
  end
  local first_key = options.first_key and options.first_key.ptr or nil
  local slopes = options.alibi_slopes and options.alibi_slopes.ptr or nil
  if options.alibi_hf_falcon_scale ~= nil then
    return wrap(C.pmp_attention_alibi_hf_falcon(q.ptr, k.ptr, v.ptr, first_key, slopes, options.alibi_hf_falcon_scale,
      options.scale or 0, causal and 1 or 0, options.window or 0))
  end
  return wrap(C.pmp_attention_alibi(q.ptr, k.ptr, v.ptr, first_key, slopes, options.scale or 0, causal and 1 or 0,
    options.window or 0))
end

--- layer_norm(x, weight, bias, eps): (x - mean) / sqrt(var + eps) * weight + bias over the last dim.
function F.layer_norm(x, weight, bias, eps)
  eps = eps or 1e-5
  local dtype = x.dtype
  local xf = (dtype == 'bf16' or dtype == 'f16') and x:float() or x
  local centered = xf - xf:mean(-1, true)
  local normed = (centered * (centered:square():mean(-1, true) + eps):rsqrt()):to(dtype)
  if weight then normed = normed * weight end
  if bias then normed = normed + bias end
  return normed
end

-- The tiny term keeps all-zero rows (padded vocabulary rows) at zero with a finite gradient, where
-- torch's max(norm, eps) would divide by eps; on any other row it changes nothing in f32.
--- normalize(x): each row (last dim) divided by its L2 norm, as torch.nn.functional.normalize.
function F.normalize(x)
  return x * (x:square():sum(-1, true) + 1e-24):rsqrt()
end

--- Inverted dropout: kept activations are scaled by 1/(1-p) during training, identity otherwise.
function F.dropout(x, p, training)
  p = p or 0.5
  if p < 0 or p > 1 then error('dropout: probability must be in [0, 1], got ' .. tostring(p), 2) end
  if training == false or p == 0 then return x end
  if p == 1 then return x * 0 end
  local keep = tensor.rand(x.shape, { dtype = x.dtype == 'f64' and 'f64' or 'f32' }):ge(p)
  return x * keep:to(x.dtype) * (1 / (1 - p))
end

return F

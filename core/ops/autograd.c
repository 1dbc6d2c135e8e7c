/*
 * Autograd: a dynamic tape. Each op on inputs that require grad records a node holding where its
 * inputs' gradients go (the producing node, or the leaf tensor), the tensors its backward rule reads,
 * and its parameters. pmp_backward visits the nodes reachable from the root in dependency order and
 * accumulates gradients into leaves' .grad_acc. The graph's saved tensors are freed afterwards unless
 * asked to keep them; a second backward through a freed graph is an error, not a wrong answer.
 */
#include "internal.h"
#include <stdio.h>

static _Thread_local int grad_enabled = 1;

int pmp_set_grad_enabled(int enabled) {
  int previous = grad_enabled;
  grad_enabled = enabled != 0;
  return previous;
}

int pmp_is_grad_enabled(void) { return grad_enabled; }

int pmp_node_op(const pmp_node *node) { return node ? node->op : -1; }

bool pmp_needs_grad(pmp_tensor *const *inputs, int n) {
  if (!grad_enabled) return false;
  for (int k = 0; k < n; k++)
    if (inputs[k] && inputs[k]->needs_grad) return true;
  return false;
}

pmp_node *pmp_record(int op, pmp_tensor *out, pmp_tensor *const *inputs, int ninputs, pmp_tensor *const *saved,
                     int nsaved) {
  pmp_node *n = calloc(1, sizeof *n + sizeof(pmp_edge) * (size_t)ninputs);
  if (!n) return pmp_fail("%s: out of memory recording the autograd node", pmp_op_name(op));
  n->refcount = 1;
  n->op = op;
  n->ninputs = ninputs;
  for (int k = 0; k < ninputs; k++) {
    pmp_tensor *in = inputs[k];
    pmp_edge *e = &n->in[k];
    if (!in) continue;
    e->ndim = in->ndim;
    e->dtype_id = in->dtype_id;
    memcpy(e->sizes, in->sizes, sizeof(int64_t) * (size_t)in->ndim);
    e->needs_grad = in->needs_grad != 0;
    if (!in->needs_grad) continue;
    if (in->grad_fn) {
      e->next = in->grad_fn;
      in->grad_fn->refcount++;
    } else {
      e->leaf = in;
      in->refcount++;
    }
  }
  for (int k = 0; k < nsaved; k++) {
    n->saved[k] = saved[k];
    pmp_tensor_retain(saved[k]);
  }
  out->grad_fn = n;
  out->needs_grad = 1;
  return n;
}

static void free_saved(pmp_node *n) {
  for (int k = 0; k < PMP_NODE_MAX_SAVED; k++) {
    pmp_tensor_release(n->saved[k]);
    n->saved[k] = NULL;
  }
  n->freed = true;
}

/* Releasing a long chain would recurse once per node; a work list keeps the C stack flat. */
static pmp_node **release_list;
static size_t release_count, release_capacity;
static bool releasing;

void pmp_node_release(pmp_node *n) {
  if (!n || --n->refcount > 0) return;
  if (release_count == release_capacity) {
    size_t cap = release_capacity ? release_capacity * 2 : 256;
    pmp_node **grown = realloc(release_list, cap * sizeof *grown);
    if (!grown) abort(); /* cannot even free memory: nothing sensible remains */
    release_list = grown;
    release_capacity = cap;
  }
  release_list[release_count++] = n;
  if (releasing) return;
  releasing = true;
  while (release_count) {
    pmp_node *node = release_list[--release_count];
    if (node->op == PMP_OP_CUSTOM) pmp_custom_node_freed(node);
    free_saved(node);
    pmp_tensor_release(node->grad_acc);
    for (int k = 0; k < node->ninputs; k++) {
      pmp_tensor_release(node->in[k].leaf);
      pmp_node_release(node->in[k].next);
    }
    free(node->ivec);
    free(node);
  }
  releasing = false;
}

bool pmp_node_check_alive(const pmp_node *n) {
  if (!n->freed) return true;
  pmp_fail("backward: trying to backward through the graph a second time (its saved tensors were freed by the "
           "first backward; pass retain_graph=true to the first call) at op %s",
           pmp_op_name(n->op));
  return false;
}

int pmp_set_requires_grad(pmp_tensor *t, int flag) {
  if (t->grad_fn && !flag)
    return pmp_fail_code("requires_grad_: only leaf tensors can stop requiring grad (use detach())");
  if (flag && !pmp_dtype_is_float(t->dtype_id))
    return pmp_fail_code("requires_grad_: only floating-point tensors can require grad, got %s",
                         pmp_dtype_name(t->dtype_id));
  t->needs_grad = flag != 0;
  return 0;
}

int pmp_set_grad(pmp_tensor *t, pmp_tensor *grad) {
  if (grad && !pmp_same_shape(t, grad)) {
    char a[PMP_SHAPE_BUF], b[PMP_SHAPE_BUF];
    return pmp_fail_code("set_grad: gradient of shape %s for a tensor of shape %s",
                         pmp_shape_str(grad->sizes, grad->ndim, a, sizeof a), pmp_shape_str(t->sizes, t->ndim, b, sizeof b));
  }
  pmp_tensor_retain(grad);
  pmp_tensor_release(t->grad_acc);
  t->grad_acc = grad;
  return 0;
}

/* True when nothing but the caller's one reference reaches t's memory, so t may be kept as a gradient
 * or added into in place. */
static bool owned_alone(const pmp_tensor *t) {
  return t->refcount == 1 && t->storage->refcount == 1 && !t->storage->release && !t->grad_fn && !t->needs_grad &&
         pmp_is_contiguous(t);
}

/* A leaf keeps g itself as its gradient instead of a copy (the usual case: a weight's gradient fresh
 * from its matmul) when g is ours alone, spans its whole storage and matches the leaf. */
static bool keepable(const pmp_tensor *g, const pmp_tensor *leaf) {
  return owned_alone(g) && g->offset == 0 && g->dtype_id == leaf->dtype_id && g->dev.type == leaf->dev.type &&
         g->dev.index == leaf->dev.index;
}

/* Leaf gradients accumulate in place, like PyTorch, so .grad_acc keeps its identity across steps. */
static int accumulate_leaf(pmp_tensor *leaf, pmp_tensor *g) {
  if (!leaf->grad_acc && keepable(g, leaf)) {
    pmp_tensor_retain(g);
    leaf->grad_acc = g;
    return 0;
  }
  if (!leaf->grad_acc) {
    pmp_tensor *own = pmp_empty_like(leaf, leaf->dtype_id);
    if (!own || pmp_copy_into(own, g) != 0) {
      pmp_tensor_release(own);
      return -1;
    }
    leaf->grad_acc = own;
    return 0;
  }
  g = g->dtype_id == leaf->grad_acc->dtype_id ? (pmp_tensor_retain(g), g) : pmp_to_dtype(g, leaf->grad_acc->dtype_id);
  if (!g) return -1;
  pmp_tensor *acc = leaf->grad_acc;
  pmp_op_args a = {.op = PMP_OP_ADD, .out = acc, .in = {acc, g}, .nin = 2};
  int rc;
  if (pmp_is_contiguous(acc)) {
    rc = pmp_dispatch(&a);
  } else {
    pmp_tensor *sum = pmp_binary(PMP_OP_ADD, acc, g);
    rc = sum ? 0 : -1;
    if (sum) {
      pmp_tensor_release(leaf->grad_acc);
      leaf->grad_acc = sum;
    }
  }
  pmp_tensor_release(g);
  return rc;
}

static int accumulate_node(pmp_node *n, pmp_tensor *g) {
  if (!n->grad_acc) {
    pmp_tensor_retain(g);
    n->grad_acc = g;
    return 0;
  }
  pmp_tensor *acc = n->grad_acc;
  if (owned_alone(acc) && acc->dtype_id == g->dtype_id && pmp_same_shape(acc, g)) {
    pmp_op_args a = {.op = PMP_OP_ADD, .out = acc, .in = {acc, g}, .nin = 2};
    return pmp_dispatch(&a);
  }
  pmp_tensor *sum = pmp_binary(PMP_OP_ADD, acc, g);
  if (!sum) return -1;
  pmp_tensor_release(n->grad_acc);
  n->grad_acc = sum;
  return 0;
}

typedef struct node_list {
  pmp_node **items;
  size_t count, capacity;
} node_list;

static bool list_push(node_list *l, pmp_node *n) {
  if (l->count == l->capacity) {
    size_t cap = l->capacity ? l->capacity * 2 : 64;
    pmp_node **grown = realloc(l->items, cap * sizeof *grown);
    if (!grown) return false;
    l->items = grown;
    l->capacity = cap;
  }
  l->items[l->count++] = n;
  return true;
}

/* Counts, for every node reachable from root, how many reachable nodes feed gradient into it. */
static int count_dependencies(pmp_node *root, uint32_t epoch) {
  node_list stack = {0};
  int rc = 0;
  root->epoch = epoch;
  root->pending = 0;
  if (!list_push(&stack, root)) rc = pmp_fail_code("backward: out of memory");
  while (rc == 0 && stack.count) {
    pmp_node *n = stack.items[--stack.count];
    for (int k = 0; k < n->ninputs; k++) {
      pmp_node *next = n->in[k].next;
      if (!next) continue;
      if (next->epoch != epoch) {
        next->epoch = epoch;
        next->pending = 0;
        if (!list_push(&stack, next)) {
          rc = pmp_fail_code("backward: out of memory");
          break;
        }
      }
      next->pending++;
    }
  }
  free(stack.items);
  return rc;
}

/* A narrow's gradient is a slice of its input's gradient. When the input node already holds a
 * gradient buffer of its own (q, k and v narrowed off one projection: the second and third to arrive),
 * the slice is added in place, instead of building a zero tensor of the full shape and adding it whole.
 * 1: done; 0: not applicable (run the op's backward); -1: failed. */
static int add_into_slice(pmp_node *n) {
  pmp_edge *e = &n->in[0];
  pmp_tensor *g = n->grad_acc, *acc = e->next ? e->next->grad_acc : NULL;
  if (n->op != PMP_OP_NARROW || !e->needs_grad || !acc || !owned_alone(acc) || acc->dtype_id != g->dtype_id ||
      acc->dtype_id != e->dtype_id)
    return 0;
  pmp_tensor *slot = pmp_narrow(acc, (int)n->i[0], n->i[1], g->sizes[n->i[0]]);
  if (!slot) return -1;
  pmp_op_args a = {.op = PMP_OP_ADD, .out = slot, .in = {slot, g}, .nin = 2};
  int rc = pmp_dispatch(&a);
  pmp_tensor_release(slot);
  return rc == 0 ? 1 : -1;
}

static int run_node(pmp_node *n, bool retain_graph) {
  pmp_tensor **grads = calloc((size_t)n->ninputs + 1, sizeof *grads);
  if (!grads) return pmp_fail_code("backward: out of memory");
  int rc = 0;
  if (n->grad_acc) {
    int sliced = pmp_node_check_alive(n) ? add_into_slice(n) : -1;
    if (sliced < 0) rc = -1;
    else if (!sliced) rc = pmp_op_table[n->op].backward(n, n->grad_acc, grads);
  }
  for (int k = 0; rc == 0 && k < n->ninputs; k++) {
    pmp_tensor *g = grads[k];
    pmp_edge *e = &n->in[k];
    if (!g || !e->needs_grad) continue;
    if (g->dtype_id != e->dtype_id) {
      pmp_tensor *converted = pmp_to_dtype(g, e->dtype_id);
      pmp_tensor_release(g);
      grads[k] = g = converted;
      if (!g) {
        rc = -1;
        break;
      }
    }
    if (g->ndim != e->ndim || memcmp(g->sizes, e->sizes, sizeof(int64_t) * (size_t)e->ndim) != 0) {
      char a[PMP_SHAPE_BUF], b[PMP_SHAPE_BUF];
      rc = pmp_fail_code("backward: engine bug: %s gave input %d a gradient of shape %s, expected %s",
                         pmp_op_name(n->op), k, pmp_shape_str(g->sizes, g->ndim, a, sizeof a),
                         pmp_shape_str(e->sizes, e->ndim, b, sizeof b));
      break;
    }
    if (e->next)
      rc = accumulate_node(e->next, g);
    else if (e->leaf)
      rc = accumulate_leaf(e->leaf, g);
  }
  for (int k = 0; k < n->ninputs; k++) pmp_tensor_release(grads[k]);
  free(grads);
  pmp_tensor_release(n->grad_acc);
  n->grad_acc = NULL;
  if (!retain_graph) free_saved(n);
  return rc;
}

int pmp_backward(pmp_tensor *t, pmp_tensor *grad, int retain_graph) {
  static uint32_t epoch;
  char a[PMP_SHAPE_BUF], b[PMP_SHAPE_BUF];
  if (!t->needs_grad)
    return pmp_fail_code("backward: the tensor does not require grad (no input of its graph called requires_grad_())");
  if (grad && !pmp_same_shape(grad, t))
    return pmp_fail_code("backward: gradient of shape %s for a tensor of shape %s",
                         pmp_shape_str(grad->sizes, grad->ndim, a, sizeof a), pmp_shape_str(t->sizes, t->ndim, b, sizeof b));
  if (!grad && pmp_numel(t) != 1)
    return pmp_fail_code("backward: a gradient is needed for a non-scalar tensor of shape %s",
                         pmp_shape_str(t->sizes, t->ndim, a, sizeof a));
  int previous_mode = pmp_set_grad_enabled(0);
  pmp_tensor *seed = grad ? (pmp_tensor_retain(grad), grad) : pmp_full(t->sizes, t->ndim, 1.0, t->dtype_id, t->dev);
  int rc = seed ? 0 : -1;
  if (rc == 0 && !t->grad_fn) {
    rc = accumulate_leaf(t, seed);
  } else if (rc == 0) {
    pmp_node *root = t->grad_fn;
    rc = pmp_node_check_alive(root) ? count_dependencies(root, ++epoch) : -1;
    node_list ready = {0};
    if (rc == 0) {
      rc = accumulate_node(root, seed);
      if (rc == 0 && !list_push(&ready, root)) rc = pmp_fail_code("backward: out of memory");
    }
    while (rc == 0 && ready.count) {
      pmp_node *n = ready.items[--ready.count];
      rc = run_node(n, retain_graph != 0);
      for (int k = 0; rc == 0 && k < n->ninputs; k++) {
        pmp_node *next = n->in[k].next;
        if (next && --next->pending == 0 && !list_push(&ready, next)) rc = pmp_fail_code("backward: out of memory");
      }
    }
    free(ready.items);
  }
  pmp_tensor_release(seed);
  pmp_set_grad_enabled(previous_mode);
  return rc;
}

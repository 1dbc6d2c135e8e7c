/* The op table: every op's name, its kernel for each device, and its backward rule. */
#include "internal.h"

#define CPU(k) .kernel = {[PMP_CPU] = (k)}

const pmp_op_info pmp_op_table[PMP_OP_COUNT] = {
    [PMP_OP_NEG] = {"neg", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_EXP] = {"exp", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_LOG] = {"log", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_SQRT] = {"sqrt", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_RSQRT] = {"rsqrt", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_ABS] = {"abs", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_SIN] = {"sin", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_COS] = {"cos", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_TANH] = {"tanh", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_SIGMOID] = {"sigmoid", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_RELU] = {"relu", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_GELU] = {"gelu", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_GELU_TANH] = {"gelu_tanh", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_SILU] = {"silu", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_SIGN] = {"sign", CPU(pmp_cpu_unary), pmp_backward_unary},
    [PMP_OP_LOGICAL_NOT] = {"logical_not", CPU(pmp_cpu_unary), NULL},
    [PMP_OP_ADD] = {"add", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_SUB] = {"sub", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_MUL] = {"mul", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_DIV] = {"div", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_POW] = {"pow", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_MAXIMUM] = {"maximum", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_MINIMUM] = {"minimum", CPU(pmp_cpu_binary), pmp_backward_binary},
    [PMP_OP_EQ] = {"eq", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_NE] = {"ne", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_LT] = {"lt", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_LE] = {"le", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_GT] = {"gt", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_GE] = {"ge", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_LOGICAL_AND] = {"logical_and", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_LOGICAL_OR] = {"logical_or", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_GELU_GRAD] = {"gelu_grad", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_GELU_TANH_GRAD] = {"gelu_tanh_grad", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_SILU_GRAD] = {"silu_grad", CPU(pmp_cpu_binary), NULL},
    [PMP_OP_WHERE] = {"where", CPU(pmp_cpu_where), pmp_backward_where},
    [PMP_OP_CLAMP] = {"clamp", CPU(pmp_cpu_clamp), pmp_backward_clamp},
    [PMP_OP_MASKED_FILL] = {"masked_fill", CPU(pmp_cpu_masked_fill), pmp_backward_masked_fill},
    [PMP_OP_TRIL] = {"tril", CPU(pmp_cpu_tri), pmp_backward_tri},
    [PMP_OP_TRIU] = {"triu", CPU(pmp_cpu_tri), pmp_backward_tri},
    [PMP_OP_COPY] = {"copy", CPU(pmp_cpu_copy), pmp_backward_identity},
    [PMP_OP_SUM] = {"sum", CPU(pmp_cpu_reduce), pmp_backward_sum},
    [PMP_OP_MEAN] = {"mean", CPU(pmp_cpu_reduce), pmp_backward_sum},
    [PMP_OP_MAX] = {"max", CPU(pmp_cpu_reduce_index), pmp_backward_max},
    [PMP_OP_MIN] = {"min", CPU(pmp_cpu_reduce_index), pmp_backward_max},
    [PMP_OP_ARGMAX] = {"argmax", CPU(pmp_cpu_reduce_index), NULL},
    [PMP_OP_ARGMIN] = {"argmin", CPU(pmp_cpu_reduce_index), NULL},
    [PMP_OP_MATMUL] = {"matmul", CPU(pmp_cpu_matmul), pmp_backward_matmul},
    [PMP_OP_VIEW] = {"view", {0}, pmp_backward_view},
    [PMP_OP_PERMUTE] = {"permute", {0}, pmp_backward_permute},
    [PMP_OP_EXPAND] = {"expand", {0}, pmp_backward_expand},
    [PMP_OP_NARROW] = {"narrow", {0}, pmp_backward_narrow},
    [PMP_OP_CAT] = {"cat", {0}, pmp_backward_cat},
    [PMP_OP_GATHER] = {"gather", CPU(pmp_cpu_gather), pmp_backward_gather},
    [PMP_OP_SCATTER_ADD] = {"scatter_add", CPU(pmp_cpu_scatter_add), pmp_backward_scatter_add},
    [PMP_OP_INDEX_SELECT] = {"index_select", CPU(pmp_cpu_index_select), pmp_backward_index_select},
    [PMP_OP_INDEX_ADD] = {"index_add", CPU(pmp_cpu_index_add), pmp_backward_index_add},
    [PMP_OP_TO_DTYPE] = {"to", {0}, pmp_backward_to_dtype},
    [PMP_OP_SOFTMAX] = {"softmax", CPU(pmp_cpu_softmax), pmp_backward_softmax},
    [PMP_OP_LOG_SOFTMAX] = {"log_softmax", CPU(pmp_cpu_softmax), pmp_backward_log_softmax},
    [PMP_OP_CROSS_ENTROPY] = {"cross_entropy", CPU(pmp_cpu_cross_entropy), pmp_backward_cross_entropy},
    [PMP_OP_CROSS_ENTROPY_BACKWARD] = {"cross_entropy_backward", CPU(pmp_cpu_cross_entropy_backward), NULL},
    [PMP_OP_FILL] = {"fill", CPU(pmp_cpu_fill), NULL},
    [PMP_OP_ARANGE] = {"arange", CPU(pmp_cpu_arange), NULL},
    [PMP_OP_RAND] = {"rand", CPU(pmp_cpu_random), NULL},
    [PMP_OP_RANDN] = {"randn", CPU(pmp_cpu_random), NULL},
    [PMP_OP_RANDINT] = {"randint", CPU(pmp_cpu_random), NULL},
    [PMP_OP_RMS_NORM] = {"rms_norm", CPU(pmp_cpu_rms_norm), pmp_backward_rms_norm},
    [PMP_OP_RMS_NORM_BACKWARD] = {"rms_norm_backward", CPU(pmp_cpu_rms_norm_backward), NULL},
    [PMP_OP_ROPE] = {"rope", CPU(pmp_cpu_rope), pmp_backward_rope},
    [PMP_OP_SWIGLU] = {"swiglu", CPU(pmp_cpu_swiglu), pmp_backward_swiglu},
    [PMP_OP_SWIGLU_BACKWARD] = {"swiglu_backward", CPU(pmp_cpu_swiglu_backward), NULL},
    [PMP_OP_ATTENTION] = {"attention", CPU(pmp_cpu_attention), pmp_backward_attention},
    [PMP_OP_ATTENTION_BACKWARD] = {"attention_backward", CPU(pmp_cpu_attention_backward), NULL},
    [PMP_OP_ADAMW] = {"adamw", CPU(pmp_cpu_adamw), NULL},
    [PMP_OP_SCALE] = {"scale", CPU(pmp_cpu_scale), NULL},
    [PMP_OP_CUSTOM] = {"custom", {0}, pmp_backward_custom},
    [PMP_OP_GROUPED_MATMUL] = {"grouped_matmul", CPU(pmp_cpu_grouped_matmul), pmp_backward_grouped_matmul},
    [PMP_OP_GROUPED_MATMUL_WEIGHT_GRAD] = {"grouped_matmul_weight_grad", CPU(pmp_cpu_grouped_matmul_weight_grad), NULL},
    [PMP_OP_MOE_UNPERMUTE] = {"moe_unpermute", CPU(pmp_cpu_moe_unpermute), pmp_backward_moe_unpermute},
    [PMP_OP_MOE_UNPERMUTE_BACKWARD] = {"moe_unpermute_backward", CPU(pmp_cpu_moe_unpermute_backward), NULL},
    [PMP_OP_PAGED_KV_WRITE] = {"paged_kv_write", CPU(pmp_cpu_paged_kv_write), NULL},
    [PMP_OP_PAGED_ATTENTION] = {"paged_attention", CPU(pmp_cpu_paged_attention), NULL},
    [PMP_OP_SAMPLE] = {"sample", CPU(pmp_cpu_sample), NULL},
};

const char *pmp_op_name(int op) { return op >= 0 && op < PMP_OP_COUNT && pmp_op_table[op].name ? pmp_op_table[op].name : "?"; }

int pmp_dispatch(const pmp_op_args *args) {
  const pmp_op_info *info = &pmp_op_table[args->op];
  int device = args->out->dev.type;
  if (!info->kernel[device])
    return pmp_fail_code("%s: no kernel for device %s in this build", info->name, device == PMP_CPU ? "cpu" : "cuda");
  int64_t start = pmp_profile_begin();
  int rc = info->kernel[device](args);
  pmp_profile_end(args->op, start);
  return rc;
}

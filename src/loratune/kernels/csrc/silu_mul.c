/* silu(gate)·up's kernels (silu_mul_body.h) for every instruction set. */
#define KERNEL_BODY "silu_mul_body.h"
#include "per_isa.h"

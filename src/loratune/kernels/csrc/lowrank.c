/* The low-rank update kernel (lowrank_body.h) for every instruction set. AVX512-BF16 CPUs run its AVX-512 copy
 * (kernels.h): there is nothing in it for AVX512-BF16 to speed up but the bf16 stores, whose conversion would
 * flush float32 denormals to zero. */
#define KERNEL_BODY "lowrank_body.h"
#define NO_AVX512_BF16_COPY 1
#include "per_isa.h"

/* The Fastfood projection's kernel (fastfood_body.h) for every instruction set. AVX512-BF16 CPUs run its AVX-512
 * copy: it works in float32 only. */
#define KERNEL_BODY "fastfood_body.h"
#define NO_AVX512_BF16_COPY 1
#include "per_isa.h"

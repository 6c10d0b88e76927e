/* RMSNorm's kernels (norm_body.h) for every instruction set. */
#include <math.h>

#define KERNEL_BODY "norm_body.h"
#include "per_isa.h"

/* The cross-entropy kernel (cross_entropy_body.h) for every instruction set. */
#include <math.h>

#define KERNEL_BODY "cross_entropy_body.h"
#include "per_isa.h"

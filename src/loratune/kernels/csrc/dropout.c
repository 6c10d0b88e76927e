/* The dropout kernel (dropout_body.h) for every instruction set. */
#define KERNEL_BODY "dropout_body.h"
#include "per_isa.h"

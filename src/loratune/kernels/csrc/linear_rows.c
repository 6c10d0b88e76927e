/* The few-row linear product (linear_rows_body.h) for every instruction set. */
#define KERNEL_BODY "linear_rows_body.h"
#include "per_isa.h"

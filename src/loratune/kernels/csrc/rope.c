/* Rotary position embedding's kernel (rope_body.h) for every instruction set. */
#define KERNEL_BODY "rope_body.h"
#include "per_isa.h"

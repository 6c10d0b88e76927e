/* Decoding attention's kernel (decode_attention_body.h) for every instruction set. */
#define KERNEL_BODY "decode_attention_body.h"
#include "per_isa.h"

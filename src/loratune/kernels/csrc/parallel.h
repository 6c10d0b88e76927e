/* Spreading one kernel call over threads (parallel.c). */
#ifndef LORATUNE_PARALLEL_H
#define LORATUNE_PARALLEL_H

#include <stdint.h>

#include "kernels.h"

/* One call's arguments: addresses, sizes, and the float eps; a span [begin, end) of elements or rows. */
typedef struct {
    int64_t v[20];
    float eps;
    void (*run)(const int64_t *v, float eps, int64_t begin, int64_t end);
    int64_t begin, end;
} job_t;

/* Runs base.run over [0, n) in up to `threads` spans (multiples of `grain`, at least `min_span` long). */
HIDDEN void parallel_for(job_t base, int64_t n, int64_t grain, int64_t min_span, int64_t threads);

#endif

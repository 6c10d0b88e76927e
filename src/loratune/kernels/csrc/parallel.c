/* Spreading one kernel call over threads: the spans of parallel_for (parallel.h). */
#include <pthread.h>
#include <stddef.h>

#include "parallel.h"

static void *run_job(void *p) {
    job_t *j = (job_t *)p;
    j->run(j->v, j->eps, j->begin, j->end);
    return NULL;
}

#define MAX_THREADS 64

/* Splits [0, n) into up to `threads` spans (multiples of `grain`, at least `min_span` long) and runs them on
 * that many threads, the calling one included. PyTorch's own elementwise operations use every thread
 * torch.get_num_threads() gives, so these do too. Built with OpenMP (Linux), the spans run on the OpenMP
 * runtime PyTorch loaded (the same libgomp.so.1), so they take PyTorch's own worker threads, which are still
 * spinning from its last operation, instead of new threads competing with them for the cores; otherwise on
 * new threads (a thread that cannot be started leaves its span to the caller). */
void parallel_for(job_t base, int64_t n, int64_t grain, int64_t min_span, int64_t threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n / min_span) threads = n / min_span;
    if (threads <= 1) {
        base.run(base.v, base.eps, 0, n);
        return;
    }
    int64_t span = (n + threads - 1) / threads;
    span = (span + grain - 1) / grain * grain;
    job_t jobs[MAX_THREADS];
    int64_t count = 0;
    for (int64_t begin = 0; begin < n; begin += span, count++) {
        jobs[count] = base;
        jobs[count].begin = begin;
        jobs[count].end = begin + span < n ? begin + span : n;
    }
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)count) schedule(static, 1)
    for (int64_t t = 0; t < count; t++) run_job(&jobs[t]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t t = 1; t < count; t++) started[t] = pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int64_t t = 1; t < count; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_job(&jobs[t]);
    }
#endif
}

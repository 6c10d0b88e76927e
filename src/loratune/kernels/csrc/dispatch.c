/* Which copy of the kernels runs: the copies of each kernel indexed by instruction set, the one pointer per
 * kernel that calls go through, and the instruction sets this CPU runs. */
#include <stddef.h>

#include "kernels.h"

#ifdef HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef HAVE_X86
#define IF_X86(f) f
#else
#define IF_X86(f) NULL
#endif
#ifdef HAVE_AVX512_BF16
#define IF_AVX512_BF16(f) f
#else
#define IF_AVX512_BF16(f) NULL
#endif

/* name_copies[isa] for every ISA up to AVX512-BF16 (NULL where not built; AMX runs the AVX512-BF16 ones), and
 * name_impl, pointing at the baseline copy until select_isa points it elsewhere. */
#define DEFINE_KERNEL(name, bf16, params)                                                                              \
    static const name##_fn name##_copies[ISA_AMX] = {name##_baseline, IF_X86(name##_avx2), IF_X86(name##_avx512),      \
                                                     IF_AVX512_BF16(name##_##bf16)};                                   \
    name##_fn name##_impl = name##_baseline;
KERNELS(DEFINE_KERNEL)
#undef DEFINE_KERNEL

const char *const isa_names[ISA_COUNT] = {"baseline", "avx2", "avx512", "avx512bf16", "amx"};
int use_amx = 0;
static int current = ISA_BASELINE;
static int runnable[ISA_COUNT] = {[ISA_BASELINE] = 1};

#ifdef HAVE_AMX
/* Asks Linux for the AMX tile state (ARCH_REQ_XCOMP_PERM for XTILEDATA); 1 when granted (or already held). */
static int amx_granted(void) {
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

void detect_isas(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    runnable[ISA_AVX2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    runnable[ISA_AVX512] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#ifdef HAVE_AVX512_BF16
    runnable[ISA_AVX512BF16] = runnable[ISA_AVX512] && __builtin_cpu_supports("avx512bf16");
#endif
#ifdef HAVE_AMX
    /* asked only where the CPU has the tiles: the grant lasts for the process */
    runnable[ISA_AMX] = runnable[ISA_AVX512BF16] && __builtin_cpu_supports("amx-tile") &&
                        __builtin_cpu_supports("amx-bf16") && amx_granted();
#endif
}

int isa_built(int isa) {
    switch (isa) {
    case ISA_BASELINE: return 1;
#ifdef HAVE_X86
    case ISA_AVX2:
    case ISA_AVX512: return 1;
#endif
#ifdef HAVE_AVX512_BF16
    case ISA_AVX512BF16: return 1;
#endif
#ifdef HAVE_AMX
    case ISA_AMX: return 1;
#endif
    default: return 0;
    }
}

int isa_runnable(int isa) {
    return isa >= 0 && isa < ISA_COUNT && runnable[isa];
}

int select_isa(int isa) {
    if (!isa_runnable(isa)) return 0;
    const int copy = isa == ISA_AMX ? ISA_AVX512BF16 : isa;
#define POINT(name, bf16, params) name##_impl = name##_copies[copy];
    KERNELS(POINT)
#undef POINT
    use_amx = isa == ISA_AMX;
    current = isa;
    return 1;
}

int current_isa(void) {
    return current;
}

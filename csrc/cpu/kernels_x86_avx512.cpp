// Kernels for AVX-512 (F, BW, VL, DQ) processors. GCC only: other compilers build the stub.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include "isa_baseline_headers.h"  // before the target pragma: see there
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// The target pragma does not define the ISA macros that ATen's and Sleef's headers test.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#else
#include <c10/util/Exception.h>

#include "kernels.h"
SA_DEFINE_UNAVAILABLE_KERNELS(AVX512)
#endif

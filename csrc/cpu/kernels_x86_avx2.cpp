// Kernels for AVX2 + FMA processors. GCC and Clang only: other compilers build the stub.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include "isa_baseline_headers.h"  // before the target pragma: see there
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif
// The target pragma does not define the ISA macros that ATen's and Sleef's headers test.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#else
#include <c10/util/Exception.h>

#include "kernels.h"
SA_DEFINE_UNAVAILABLE_KERNELS(AVX2)
#endif

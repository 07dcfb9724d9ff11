// Kernels for any x86-64 or other processor, built with the compiler's default flags.
// Keep this file first among the kernel sources in setup.py and CMakeLists.txt: inline
// functions shared with the AVX files then resolve to these portable copies at link time.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

// Kernels for any x86-64 or other processor, built with the compiler's default flags.
// It must link before kernels_x86_*.cpp (setup.py links in sorted order, CMakeLists.txt in
// listed order): inline functions shared with the AVX files then resolve to these portable
// copies. tests/test_build.py checks the built library for it.
#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

// Headers a kernels_x86_*.cpp file includes before its `#pragma GCC target`, so that they
// are compiled for the baseline instruction set like every other file.
//
// GCC 13's standard library marks std::allocator's members always_inline. Declared under a
// target pragma they take the pragma's target, but the special members the compiler writes
// implicitly (std::string's _Alloc_hider destructor, say) do not, and inlining the one into
// the other fails to compile ("inlining failed in call to 'always_inline' ...: target
// specific option mismatch"). Only ATen's vector headers, which need the wider registers,
// are left to be included after the pragma.
#pragma once

#if __has_include(<bits/stdc++.h>)
#include <bits/stdc++.h>  // libstdc++: every standard header
#else
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>
#endif

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

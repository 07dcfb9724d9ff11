// The Python extension module sparse_attention._C. Importing it registers the ops
// (torch.ops.sparse_attention.*); it also reports how the library was built.
#include <torch/extension.h>

#include "cpu/kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Block-sparse attention kernels; the ops live in torch.ops.sparse_attention";
  m.def("cpu_capability", &sparse_attention::cpu::kernel_capability,
        "Instruction set the CPU kernels run with: AVX512, AVX2 or DEFAULT.");
#ifdef SPARSE_ATTENTION_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}

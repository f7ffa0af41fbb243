// Packing engine: the hot loops of sequence planning, nothing else.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_packing, m) {
    m.doc() = "megatron_pack packing engine (C++)";
}

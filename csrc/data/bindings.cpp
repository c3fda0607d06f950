// Python bindings of megalite._data.
#include <pybind11/stl.h>

#include "data.h"

namespace py = pybind11;
using megalite_data::IndexedDatasetBuilder;

PYBIND11_MODULE(_data, m) {
  m.doc() = "megalite's native data helpers: indexed-dataset builder, sample and blending indices";
  py::class_<IndexedDatasetBuilder>(m, "IndexedDatasetBuilder")
      .def(py::init<const std::string&, int, int>(), py::arg("bin_path"), py::arg("dtype_code"), py::arg("itemsize"))
      .def("add_item", &IndexedDatasetBuilder::add_item)
      .def("end_document", &IndexedDatasetBuilder::end_document)
      .def("add_document", &IndexedDatasetBuilder::add_document)
      .def("add_index", &IndexedDatasetBuilder::add_index)
      .def("finalize", &IndexedDatasetBuilder::finalize);
  py::class_<megalite_data::ByteLevelBPE>(m, "ByteLevelBPE")
      .def(py::init<py::array_t<uint8_t, py::array::c_style | py::array::forcecast>,
                    const std::vector<std::pair<py::bytes, int32_t>>&,
                    const std::vector<std::pair<py::bytes, py::bytes>>&, size_t>(),
           py::arg("classes"), py::arg("vocab"), py::arg("merges"), py::arg("cache_size"))
      .def("encode", &megalite_data::ByteLevelBPE::encode, py::arg("utf8"), py::arg("append") = -1);
  m.def("build_sample_idx", &megalite_data::build_sample_idx);
  m.def("build_blending_indices", &megalite_data::build_blending_indices);
  m.def("build_exhaustive_blending_indices", &megalite_data::build_exhaustive_blending_indices);
}

// Python bindings of megalite._data.
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
  m.def("build_sample_idx", &megalite_data::build_sample_idx);
  m.def("build_blending_indices", &megalite_data::build_blending_indices);
  m.def("build_exhaustive_blending_indices", &megalite_data::build_exhaustive_blending_indices);
}

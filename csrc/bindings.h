// Shared by the files that register the pybind11 functions of seqkern._C.
#pragma once

#include <torch/extension.h>

namespace seqkern {
// The kernels touch no Python object, so they run with the GIL released: other Python threads
// (a data loader, a second model) are not blocked for a kernel's whole duration, as with
// torch's own ops. Arguments are converted before it is released, results after it is retaken.
inline const pybind11::call_guard<pybind11::gil_scoped_release> kReleaseGil{};
}  // namespace seqkern

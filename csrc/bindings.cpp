// pybind11 glue for ttc::BlockManager (module ttc_fast._C). Converts Python token lists to flat
// int32 buffers and writes results straight into numpy arrays; all logic is in block_manager.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>

#include "block_manager.h"

namespace py = pybind11;
using ttc::BlockManager;

namespace {

// Append the ints of a Python sequence (list, tuple, numpy array, ...) to `out` as int32.
void extend_tokens(py::handle obj, std::vector<int32_t>& out) {
    // PySequence_Fast gives direct item access for lists/tuples: this is the decode hot path.
    py::object fast = py::reinterpret_steal<py::object>(
        PySequence_Fast(obj.ptr(), "tokens must be a sequence of ints"));
    if (!fast) throw py::error_already_set();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
    PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
    out.reserve(out.size() + static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
        const long long v = PyLong_AsLongLong(items[i]);
        if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
        if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
            throw py::value_error("token " + std::to_string(v) + " does not fit in int32");
        out.push_back(static_cast<int32_t>(v));
    }
}

py::list copies_to_list(const std::vector<ttc::Copy>& copies) {
    py::list out(copies.size());
    for (size_t i = 0; i < copies.size(); ++i)
        out[i] = py::make_tuple(copies[i].first, copies[i].second);
    return out;
}

py::dict stats(const BlockManager& m) {
    py::dict d;
    d["num_blocks"] = m.num_blocks();
    d["block_size"] = m.block_size();
    d["num_sequences"] = m.num_sequences();
    d["num_free_blocks"] = m.num_free_blocks();
    d["num_cached_blocks"] = m.num_cached_blocks();
    d["num_available_blocks"] = m.num_available_blocks();
    d["num_used_blocks"] = m.num_used_blocks();
    d["num_shared_blocks"] = m.num_shared_blocks();
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "ttc_fast C++ extension: the paged KV-cache block manager";

    py::register_exception<ttc::OutOfBlocksError>(m, "OutOfBlocks", PyExc_RuntimeError);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ttc::UnknownSequenceError& e) {
            PyErr_SetString(PyExc_KeyError, e.what());
        }
    });

    py::class_<BlockManager>(m, "BlockManager", R"doc(
Paged KV-cache block manager: refcounted blocks shared by forks, copy-on-write of shared partial
blocks, and a content-verified prefix cache with LRU eviction. See ttc_fast.block_manager.
)doc")
        .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
             py::arg("enable_prefix_cache") = true)
        .def("new_sequence", &BlockManager::new_sequence, "Create an empty sequence; returns its id.")
        .def(
            "match_prefix",
            [](BlockManager& self, int64_t seq, py::handle tokens) {
                std::vector<int32_t> toks;
                extend_tokens(tokens, toks);
                return self.match_prefix(seq, toks.data(), static_cast<int64_t>(toks.size()));
            },
            py::arg("seq"), py::arg("tokens"),
            "Attach cached blocks covering a prefix of tokens to an empty sequence; returns the "
            "number of tokens covered (never the last one).")
        .def(
            "append",
            [](BlockManager& self, int64_t seq, py::handle tokens) {
                std::vector<int32_t> toks;
                extend_tokens(tokens, toks);
                py::array_t<int32_t> slots(static_cast<py::ssize_t>(toks.size()));
                std::vector<ttc::Copy> copies;
                self.append(seq, toks.data(), static_cast<int64_t>(toks.size()),
                            slots.mutable_data(), copies);
                return py::make_tuple(slots, copies_to_list(copies));
            },
            py::arg("seq"), py::arg("tokens"),
            "Reserve KV slots for tokens; returns (slots int32[n], [(src, dst) block copies]).")
        .def(
            "append_batch",
            [](BlockManager& self, const std::vector<int64_t>& seqs, py::sequence tokens) {
                if (static_cast<size_t>(py::len(tokens)) != seqs.size())
                    throw py::value_error("append_batch: " + std::to_string(seqs.size()) +
                                          " sequences but " + std::to_string(py::len(tokens)) +
                                          " token lists");
                std::vector<int32_t> flat;
                std::vector<int64_t> offsets;
                offsets.reserve(seqs.size() + 1);
                offsets.push_back(0);
                for (size_t i = 0; i < seqs.size(); ++i) {
                    extend_tokens(tokens[i], flat);
                    offsets.push_back(static_cast<int64_t>(flat.size()));
                }
                py::array_t<int32_t> slots(static_cast<py::ssize_t>(flat.size()));
                std::vector<ttc::Copy> copies;
                self.append_batch(seqs, flat, offsets, slots.mutable_data(), copies);
                return py::make_tuple(slots, copies_to_list(copies));
            },
            py::arg("seqs"), py::arg("tokens"),
            "append() for each sequence in order, all-or-nothing; returns (slot_mapping "
            "int32[sum n], copies).")
        .def("fork", &BlockManager::fork, py::arg("parent"), py::arg("n"),
             "n new sequences sharing every block of parent; returns their ids.")
        .def("free", &BlockManager::free, py::arg("seq"), "Release a sequence and its blocks.")
        .def("block_table", &BlockManager::block_table, py::arg("seq"))
        .def("seq_len", &BlockManager::seq_len, py::arg("seq"))
        .def("refcount", &BlockManager::refcount, py::arg("block"))
        .def("blocks_needed", &BlockManager::blocks_needed, py::arg("seq"), py::arg("n"),
             "New blocks an append of n tokens would take (copy-on-write included).")
        .def(
            "block_tables",
            [](const BlockManager& self, const std::vector<int64_t>& seqs, int64_t width) {
                if (width < 0) throw py::value_error("width must be >= 0");
                const int64_t w = std::max(width, self.max_blocks(seqs));
                const auto b = static_cast<py::ssize_t>(seqs.size());
                py::array_t<int32_t> tables({b, static_cast<py::ssize_t>(w)});
                py::array_t<int32_t> lens(b);
                self.fill_block_tables(seqs, w, tables.mutable_data(), lens.mutable_data());
                return py::make_tuple(tables, lens);
            },
            py::arg("seqs"), py::arg("width") = 0,
            "(int32[B, W] block tables padded with 0, int32[B] context lengths), "
            "W = max(width, most blocks among seqs).")
        .def("reset_prefix_cache", &BlockManager::reset_prefix_cache,
             "Return every unused cached block to the free list and forget its content.")
        .def("check_invariants", &BlockManager::check_invariants,
             "Recount refcounts from the live sequences; raises RuntimeError on any mismatch.")
        .def("stats", &stats)
        .def_property_readonly("num_blocks", &BlockManager::num_blocks)
        .def_property_readonly("block_size", &BlockManager::block_size)
        .def_property_readonly("enable_prefix_cache", &BlockManager::enable_prefix_cache)
        .def_property_readonly("num_sequences", &BlockManager::num_sequences)
        .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
        .def_property_readonly("num_cached_blocks", &BlockManager::num_cached_blocks)
        .def_property_readonly("num_available_blocks", &BlockManager::num_available_blocks)
        .def_property_readonly("num_used_blocks", &BlockManager::num_used_blocks)
        .def_property_readonly("num_shared_blocks", &BlockManager::num_shared_blocks);
}

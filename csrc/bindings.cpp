// pybind11 glue for ttc::BlockManager and the CPU sampler's candidate filter (module ttc_fast._C).
// Converts Python token lists to flat int32 buffers and writes results straight into numpy
// arrays; all logic is in block_manager.cpp and gumbel_sample.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <unordered_set>

#include "block_manager.h"
#include "gumbel_sample.h"

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

// (int32[B, W] block tables, int32[B] lengths) of seqs, W = max(width, most blocks among them).
py::tuple block_tables(const BlockManager& self, const std::vector<int64_t>& seqs, int64_t width) {
    if (width < 0) throw py::value_error("width must be >= 0");
    const int64_t w = std::max(width, self.max_blocks(seqs));
    const auto b = static_cast<py::ssize_t>(seqs.size());
    py::array_t<int32_t> tables({b, static_cast<py::ssize_t>(w)});
    py::array_t<int32_t> lens(b);
    self.fill_block_tables(seqs, w, tables.mutable_data(), lens.mutable_data());
    return py::make_tuple(tables, lens);
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
    m.doc() = "ttc_fast C++ extension: the paged KV-cache block manager, the CPU sampler's filter";

    m.def(
        "gumbel_sample",
        [](py::array_t<float, py::array::c_style> x, py::array_t<float, py::array::c_style> inv_t,
           py::array_t<int64_t, py::array::c_style> seeds, py::array_t<int64_t, py::array::c_style> positions,
           py::array_t<uint8_t, py::array::c_style> greedy) {
            if (x.ndim() != 2) throw py::value_error("gumbel_sample: x must be [rows, vocab]");
            const int64_t rows = x.shape(0), vocab = x.shape(1);
            if (inv_t.size() != rows || seeds.size() != rows || positions.size() != rows || greedy.size() != rows)
                throw py::value_error("gumbel_sample: inv_t, seeds, positions and greedy need one entry per row");
            py::array_t<int64_t> out(rows);
            int64_t* dst = out.mutable_data();
            {
                py::gil_scoped_release release;
                ttc::gumbel_sample(x.data(), rows, vocab, inv_t.data(), seeds.data(), positions.data(),
                                   greedy.data(), dst);
            }
            return out;
        },
        py::arg("x"), py::arg("inv_t"), py::arg("seeds"), py::arg("positions"), py::arg("greedy"),
        "One Gumbel-max draw per row: int64[rows]; see csrc/gumbel_sample.h.");

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
            [](BlockManager& self, py::array_t<int64_t, py::array::c_style | py::array::forcecast> seqs,
               py::array_t<int32_t, py::array::c_style | py::array::forcecast> flat,
               py::array_t<int64_t, py::array::c_style | py::array::forcecast> offsets) {
                // The engine's hot path: flat token buffer, no Python lists.
                if (offsets.size() != seqs.size() + 1)
                    throw py::value_error("append_batch: offsets needs one entry per sequence, plus one");
                std::vector<int64_t> seq_v(seqs.data(), seqs.data() + seqs.size());
                std::vector<int32_t> flat_v(flat.data(), flat.data() + flat.size());
                std::vector<int64_t> off_v(offsets.data(), offsets.data() + offsets.size());
                if (off_v.front() != 0 || off_v.back() != static_cast<int64_t>(flat_v.size()))
                    throw py::value_error("append_batch: offsets must run from 0 to the number of tokens");
                for (size_t i = 0; i + 1 < off_v.size(); ++i)
                    if (off_v[i + 1] < off_v[i]) throw py::value_error("append_batch: offsets must not decrease");
                py::array_t<int32_t> slots(static_cast<py::ssize_t>(flat_v.size()));
                std::vector<ttc::Copy> copies;
                self.append_batch(seq_v, flat_v, off_v, slots.mutable_data(), copies);
                return py::make_tuple(slots, copies_to_list(copies));
            },
            py::arg("seqs"), py::arg("flat_tokens"), py::arg("offsets"),
            "append_batch with numpy inputs: sequence i's tokens are flat_tokens[offsets[i]:offsets[i+1]].")
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
        .def(
            "set_tokens",
            [](BlockManager& self, py::array_t<int64_t, py::array::c_style | py::array::forcecast> seqs,
               py::array_t<int64_t, py::array::c_style | py::array::forcecast> positions,
               py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
                if (positions.size() != seqs.size() || tokens.size() != seqs.size())
                    throw py::value_error("set_tokens: seqs, positions and tokens must have the same length");
                self.set_tokens(seqs.data(), positions.data(), tokens.data(), seqs.size());
            },
            py::arg("seqs"), py::arg("positions"), py::arg("tokens"),
            "Write tokens appended as unknown (-1) once they are known; a block they complete "
            "enters the prefix cache. All or nothing.")
        .def("truncate", &BlockManager::truncate, py::arg("seq"), py::arg("n"),
             "Remove the last n tokens of seq, which must all be unknown (-1).")
        .def("free", &BlockManager::free, py::arg("seq"), "Release a sequence and its blocks.")
        .def(
            "free_many",
            [](BlockManager& self, py::array_t<int64_t, py::array::c_style | py::array::forcecast> seqs) {
                const int64_t* ids = seqs.data();
                std::unordered_set<int64_t> seen;
                for (py::ssize_t i = 0; i < seqs.size(); ++i) {
                    self.seq_len(ids[i]);  // throws KeyError for an unknown id, before anything is freed
                    if (!seen.insert(ids[i]).second)
                        throw py::value_error("free_many: sequence " + std::to_string(ids[i]) + " is listed twice");
                }
                for (py::ssize_t i = 0; i < seqs.size(); ++i) self.free(ids[i]);
            },
            py::arg("seqs"), "free() each sequence, in order; all or nothing (unknown or repeated ids raise first).")
        .def("block_table", &BlockManager::block_table, py::arg("seq"))
        .def("seq_len", &BlockManager::seq_len, py::arg("seq"))
        .def(
            "seq_lens",
            [](const BlockManager& self, py::array_t<int64_t, py::array::c_style | py::array::forcecast> seqs) {
                py::array_t<int64_t> lens(seqs.size());
                auto* out = lens.mutable_data();
                for (py::ssize_t i = 0; i < seqs.size(); ++i) out[i] = self.seq_len(seqs.data()[i]);
                return lens;
            },
            py::arg("seqs"), "seq_len of each sequence: int64[B].")
        .def("refcount", &BlockManager::refcount, py::arg("block"))
        .def("blocks_needed", &BlockManager::blocks_needed, py::arg("seq"), py::arg("n"),
             "New blocks an append of n tokens would take (copy-on-write included).")
        .def(
            "block_tables",
            [](const BlockManager& self, py::array_t<int64_t, py::array::c_style> seqs, int64_t width) {
                return block_tables(self, std::vector<int64_t>(seqs.data(), seqs.data() + seqs.size()), width);
            },
            py::arg("seqs"), py::arg("width") = 0)
        .def("block_tables", &block_tables, py::arg("seqs"), py::arg("width") = 0,
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

// ferry._ferry: the C API of include/ferry/ferry.h as Python objects. Tensors never reach this file:
// the Python layer checks shape, dtype, stride and device and passes raw addresses, so the extension
// does not depend on torch's C++ ABI and one wheel serves every torch version.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ferry/ferry.h"

namespace nb = nanobind;

namespace {

// A failed C call: the status and ferry_last_error() of the thread that made it.
struct StatusError {
  ferry_status_t status;
  std::string message;
};

// Python exception type per ferry_status_t, registered once by ferry/errors.py. The references are
// kept for the life of the process: the translator may run while the interpreter shuts down.
PyObject* g_error_types[FERRY_ERR_INTERNAL + 1] = {};

void raise_on_error(ferry_status_t status, const std::string& context = {}) {
  if (status == FERRY_OK) return;
  std::string message = ferry_last_error();
  if (!context.empty()) message += context;
  throw StatusError{status, std::move(message)};
}

void translate(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const StatusError& e) {
    const int index = e.status >= 0 && e.status <= FERRY_ERR_INTERNAL ? e.status : FERRY_ERR_INTERNAL;
    PyObject* type = g_error_types[index] ? g_error_types[index] : PyExc_RuntimeError;
    PyObject* args = Py_BuildValue("(is)", int(e.status), e.message.c_str());
    if (args) {
      PyErr_SetObject(type, args);
      Py_DECREF(args);
    }
  }
}

// The caller's process group as the bootstrap: a Python callable `allgather(bytes) -> bytes` that
// returns world_size * len(input) bytes, rank-major. Ferry calls it from the thread that creates
// the all-to-all (with the GIL released there), so it takes the GIL back here.
struct CallbackGroup {
  nb::object allgather;
  int world_size = 1;
  std::string error;  // what the last failed call raised, for the create error's text

  static int call(void* context, const void* in, size_t bytes, void* out) {
    auto* self = static_cast<CallbackGroup*>(context);
    nb::gil_scoped_acquire gil;
    try {
      nb::object result = self->allgather(nb::bytes(static_cast<const char*>(in), bytes));
      if (!nb::isinstance<nb::bytes>(result)) {
        self->error = "allgather returned " + std::string(nb::type_name(result.type()).c_str()) + ", expected bytes";
        return 2;
      }
      nb::bytes gathered = nb::borrow<nb::bytes>(result);
      const size_t want = bytes * size_t(self->world_size);
      if (gathered.size() != want) {
        self->error = "allgather returned " + std::to_string(gathered.size()) + " bytes, expected " +
                      std::to_string(want) + " (world_size " + std::to_string(self->world_size) + " x " +
                      std::to_string(bytes) + ")";
        return 3;
      }
      std::memcpy(out, gathered.c_str(), want);
      self->error.clear();
      return 0;
    } catch (const nb::python_error& e) {
      self->error = e.what();
      return 1;
    } catch (const std::exception& e) {
      self->error = e.what();
      return 1;
    }
  }
};

class Bootstrap {
 public:
  static Bootstrap from_env(int timeout_ms) {
    Bootstrap b;
    {
      nb::gil_scoped_release release;
      b.status_ = ferry_bootstrap_from_env(timeout_ms, &b.handle_);
    }
    raise_on_error(b.status_);
    return b;
  }

  static Bootstrap tcp(const std::string& master_addr, int master_port, int rank, int world_size, int timeout_ms) {
    Bootstrap b;
    {
      nb::gil_scoped_release release;
      b.status_ = ferry_bootstrap_tcp(master_addr.c_str(), master_port, rank, world_size, timeout_ms, &b.handle_);
    }
    raise_on_error(b.status_);
    return b;
  }

  static Bootstrap mpi() {
    Bootstrap b;
    {
      nb::gil_scoped_release release;
      b.status_ = ferry_bootstrap_mpi(&b.handle_);
    }
    raise_on_error(b.status_);
    return b;
  }

  static Bootstrap callback(int rank, int world_size, nb::object allgather) {
    if (!PyCallable_Check(allgather.ptr())) throw nb::type_error("allgather must be callable: allgather(bytes) -> bytes");
    Bootstrap b;
    b.group_ = std::make_unique<CallbackGroup>();
    b.group_->allgather = std::move(allgather);
    b.group_->world_size = world_size > 0 ? world_size : 1;
    {
      // Construction may already gather (host names, when locality is not given).
      nb::gil_scoped_release release;
      b.status_ = ferry_bootstrap_callback(rank, world_size, &CallbackGroup::call, b.group_.get(), &b.handle_);
    }
    raise_on_error(b.status_, b.callback_context());
    return b;
  }

  Bootstrap() = default;
  Bootstrap(Bootstrap&& o) noexcept
      : handle_(std::exchange(o.handle_, nullptr)), group_(std::move(o.group_)), status_(o.status_) {}
  Bootstrap& operator=(Bootstrap&&) = delete;
  ~Bootstrap() { close(); }

  void close() {
    if (handle_) ferry_bootstrap_destroy(std::exchange(handle_, nullptr));
  }
  bool closed() const { return handle_ == nullptr; }

  // What the library's bootstrap says, whichever launcher it read.
  int rank() const {
    int v = -1;
    raise_on_error(ferry_bootstrap_rank(handle(), &v));
    return v;
  }
  int world_size() const {
    int v = 0;
    raise_on_error(ferry_bootstrap_world_size(handle(), &v));
    return v;
  }

  ferry_bootstrap_t handle() const {
    if (!handle_) throw StatusError{FERRY_ERR_INVALID_ARGUMENT, "bootstrap is closed"};
    return handle_;
  }

  // The callback's own failure, appended to a create error it caused.
  std::string callback_context() const {
    if (!group_ || group_->error.empty()) return {};
    return "; the allgather callback raised: " + group_->error;
  }

 private:
  ferry_bootstrap_t handle_ = nullptr;
  std::unique_ptr<CallbackGroup> group_;
  ferry_status_t status_ = FERRY_OK;
};

// ferry_a2a_config_t with an owned provider string.
struct Config {
  ferry_a2a_config_t c;
  std::optional<std::string> provider;

  Config() { ferry_a2a_config_init(&c); }
  const ferry_a2a_config_t& get() {
    c.provider = provider ? provider->c_str() : nullptr;
    return c;
  }
};

nb::dict sizes_dict(const ferry_buffer_sizes_t& s) {
  nb::dict d;
  d["record_bytes"] = s.record_bytes;
  d["send_bytes"] = s.send_bytes;
  d["recv_bytes"] = s.recv_bytes;
  d["combine_send_bytes"] = s.combine_send_bytes;
  d["combine_recv_bytes"] = s.combine_recv_bytes;
  d["total_registered_bytes"] = s.total_registered_bytes;
  d["max_rows_per_expert"] = s.max_rows_per_expert;
  d["num_local_experts"] = s.num_local_experts;
  return d;
}

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// ferry_dispatch_args_t's per-call options past the pplx-kernels arguments (quantize on dispatch,
// the scales' layout, the rows' sources).
struct DispatchOptions {
  int quantize = FERRY_QUANTIZE_NONE;
  bool round_scale = false;
  int out_scale_layout = FERRY_SCALE_ROW_MAJOR;
  uintptr_t out_expert_src_token = 0;
  uintptr_t out_expert_num_tokens_per_rank = 0;
};

ferry_dispatch_args_t dispatch_args(uintptr_t out_expert_num_tokens, uintptr_t out_expert_x,
                                    uintptr_t out_expert_x_scale, uintptr_t dp_x, uintptr_t dp_x_scale,
                                    uintptr_t indices, uintptr_t weights, uintptr_t bound_m, int num_tokens,
                                    int flags, const DispatchOptions& o = {}) {
  ferry_dispatch_args_t a{};
  a.out_expert_num_tokens = ptr<int32_t>(out_expert_num_tokens);
  a.out_expert_x = ptr<void>(out_expert_x);
  a.out_expert_x_scale = ptr<float>(out_expert_x_scale);
  a.dp_x = ptr<const void>(dp_x);
  a.dp_x_scale = ptr<const float>(dp_x_scale);
  a.indices = ptr<const int32_t>(indices);
  a.weights = ptr<const float>(weights);
  a.bound_m = ptr<const int32_t>(bound_m);
  a.num_tokens = num_tokens;
  a.flags = flags;
  a.quantize = ferry_quantize_t(o.quantize);
  a.round_scale = o.round_scale ? 1 : 0;
  a.out_scale_layout = ferry_scale_layout_t(o.out_scale_layout);
  a.out_expert_src_token = ptr<int32_t>(o.out_expert_src_token);
  a.out_expert_num_tokens_per_rank = ptr<int32_t>(o.out_expert_num_tokens_per_rank);
  return a;
}

ferry_combine_args_t combine_args(uintptr_t out_tokens, uintptr_t indices, uintptr_t weights, uintptr_t expert_y,
                                  uintptr_t bound_m, int num_tokens, bool accumulate, int flags) {
  ferry_combine_args_t a{};
  a.out_tokens = ptr<void>(out_tokens);
  a.indices = ptr<const int32_t>(indices);
  a.weights = ptr<const float>(weights);
  a.expert_y = ptr<const void>(expert_y);
  a.bound_m = ptr<const int32_t>(bound_m);
  a.num_tokens = num_tokens;
  a.accumulate = accumulate ? 1 : 0;
  a.flags = flags;
  return a;
}

using Clock = std::chrono::steady_clock;

int64_t ns_since(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
}

class AllToAll {
 public:
  AllToAll(Config& config, nb::object bootstrap) : config_(config), bootstrap_(std::move(bootstrap)) {
    Bootstrap& b = nb::cast<Bootstrap&>(bootstrap_);
    const ferry_a2a_config_t& c = config_.get();
    ferry_bootstrap_t handle = b.handle();
    ferry_status_t status;
    {
      // Create is collective and may call back into Python (the process-group bootstrap).
      nb::gil_scoped_release release;
      status = ferry_a2a_create(&c, handle, &handle_);
    }
    raise_on_error(status, b.callback_context());
    {
      nb::gil_scoped_release release;
      status = ferry_a2a_buffer_bytes(handle_, &sizes_);
    }
    raise_on_error(status);
  }
  AllToAll(const AllToAll&) = delete;
  AllToAll& operator=(const AllToAll&) = delete;
  ~AllToAll() {
    if (handle_) ferry_a2a_destroy(std::exchange(handle_, nullptr));
  }

  void dispatch(uintptr_t out_expert_num_tokens, uintptr_t out_expert_x, uintptr_t out_expert_x_scale, uintptr_t dp_x,
                uintptr_t dp_x_scale, uintptr_t indices, uintptr_t weights, uintptr_t bound_m, int num_tokens,
                int flags, uintptr_t stream, int quantize, bool round_scale, int out_scale_layout,
                uintptr_t out_expert_src_token, uintptr_t out_expert_num_tokens_per_rank) {
    const DispatchOptions o{quantize, round_scale, out_scale_layout, out_expert_src_token,
                            out_expert_num_tokens_per_rank};
    call(ferry_a2a_dispatch, dispatch_args(out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x, dp_x_scale,
                                           indices, weights, bound_m, num_tokens, flags, o),
         stream);
  }

  void combine(uintptr_t out_tokens, uintptr_t indices, uintptr_t weights, uintptr_t expert_y, uintptr_t bound_m,
               int num_tokens, bool accumulate, int flags, uintptr_t stream) {
    call(ferry_a2a_combine, combine_args(out_tokens, indices, weights, expert_y, bound_m, num_tokens, accumulate, flags),
         stream);
  }

  // The benchmark's baseline: `iterations` blocking dispatch + combine steps issued from C++ with
  // the same addresses the Python layer would pass. Returns [dispatch ns, combine ns] per step.
  std::vector<int64_t> time_steps(uintptr_t out_expert_num_tokens, uintptr_t out_expert_x,
                                  uintptr_t out_expert_x_scale, uintptr_t dp_x, uintptr_t dp_x_scale,
                                  uintptr_t indices, uintptr_t weights, int num_tokens, uintptr_t expert_y,
                                  uintptr_t out_tokens, int iterations, uintptr_t stream) {
    const ferry_dispatch_args_t d = dispatch_args(out_expert_num_tokens, out_expert_x, out_expert_x_scale, dp_x,
                                                  dp_x_scale, indices, weights, 0, num_tokens, FERRY_SEND_RECV);
    const ferry_combine_args_t c =
        combine_args(out_tokens, indices, weights, expert_y, 0, num_tokens, false, FERRY_SEND_RECV);
    ferry_a2a_t h = open_handle();
    std::vector<int64_t> ns;
    ns.reserve(size_t(2) * size_t(iterations > 0 ? iterations : 0));
    ferry_status_t status = FERRY_OK;
    {
      nb::gil_scoped_release release;
      for (int i = 0; i < iterations && status == FERRY_OK; ++i) {
        auto start = Clock::now();
        status = ferry_a2a_dispatch(h, &d, ptr<void>(stream));
        ns.push_back(ns_since(start));
        if (status != FERRY_OK) break;
        start = Clock::now();
        status = ferry_a2a_combine(h, &c, ptr<void>(stream));
        ns.push_back(ns_since(start));
      }
    }
    raise_on_error(status);
    return ns;
  }

  nb::dict buffer_sizes() const { return sizes_dict(sizes_); }

  nb::dict stats() {
    ferry_a2a_stats_t s{};
    raise_on_error(ferry_a2a_stats(open_handle(), &s));
    nb::dict d;
    d["dispatch_bytes_sent"] = s.dispatch_bytes_sent;
    d["combine_bytes_sent"] = s.combine_bytes_sent;
    d["dispatch_records_sent"] = s.dispatch_records_sent;
    d["overflow_records_sent"] = s.overflow_records_sent;
    return d;
  }

  void close() {
    if (!handle_) return;
    ferry_a2a_t h = std::exchange(handle_, nullptr);
    ferry_status_t status;
    {
      // Destroy drains writes still in flight (bounded by the deadline) and joins threads.
      nb::gil_scoped_release release;
      status = ferry_a2a_destroy(h);
    }
    raise_on_error(status);
  }

  bool closed() const { return handle_ == nullptr; }
  int64_t last_call_ns() const { return last_call_ns_; }

 private:
  // One blocking C call with the GIL released (the CUDA backend's eager receive synchronises its
  // stream, the host backend waits for the peers), timed for the benchmark's split.
  template <class Args>
  void call(ferry_status_t (*fn)(ferry_a2a_t, const Args*, void*), const Args& args, uintptr_t stream) {
    ferry_a2a_t h = open_handle();
    ferry_status_t status;
    {
      nb::gil_scoped_release release;
      const auto start = Clock::now();
      status = fn(h, &args, ptr<void>(stream));
      last_call_ns_ = ns_since(start);
    }
    raise_on_error(status);
  }

  ferry_a2a_t open_handle() const {
    if (!handle_) throw StatusError{FERRY_ERR_INVALID_ARGUMENT, "all-to-all is closed"};
    return handle_;
  }

  Config config_;
  nb::object bootstrap_;  // the bootstrap (and the process group it calls) outlives the handle
  ferry_a2a_t handle_ = nullptr;
  ferry_buffer_sizes_t sizes_{};
  int64_t last_call_ns_ = 0;
};

}  // namespace

NB_MODULE(_ferry, m) {
  m.doc() = "Ferry's C API (include/ferry/ferry.h); use the `ferry` package, which checks tensors first.";
  nb::register_exception_translator(translate);

  m.attr("VERSION_MAJOR") = FERRY_VERSION_MAJOR;
  m.attr("VERSION_MINOR") = FERRY_VERSION_MINOR;
  m.attr("SEND") = int(FERRY_SEND);
  m.attr("RECV") = int(FERRY_RECV);
  m.attr("SEND_RECV") = int(FERRY_SEND_RECV);
  m.attr("BF16") = int(FERRY_BF16);
  m.attr("F16") = int(FERRY_F16);
  m.attr("F32") = int(FERRY_F32);
  m.attr("FP8_E4M3") = int(FERRY_FP8_E4M3);
  m.attr("DEVICE_HOST") = int(FERRY_DEVICE_HOST);
  m.attr("DEVICE_CUDA") = int(FERRY_DEVICE_CUDA);
  m.attr("QUANTIZE_NONE") = int(FERRY_QUANTIZE_NONE);
  m.attr("QUANTIZE_FP8_BLOCK") = int(FERRY_QUANTIZE_FP8_BLOCK);
  m.attr("SCALE_ROW_MAJOR") = int(FERRY_SCALE_ROW_MAJOR);
  m.attr("SCALE_COLUMN_MAJOR") = int(FERRY_SCALE_COLUMN_MAJOR);
  m.attr("SCALE_UE8M0_COLUMN_MAJOR") = int(FERRY_SCALE_UE8M0_COLUMN_MAJOR);
  m.attr("WEIGHTS_AT_DISPATCH") = int(FERRY_WEIGHTS_AT_DISPATCH);
  m.attr("WEIGHTS_AT_COMBINE") = int(FERRY_WEIGHTS_AT_COMBINE);

  m.def("set_error_types", [](nb::dict types) {
    for (auto [key, value] : types) {
      const int status = nb::cast<int>(key);
      if (status < 0 || status > FERRY_ERR_INTERNAL) throw nb::value_error("status outside ferry_status_t");
      Py_XINCREF(value.ptr());
      g_error_types[status] = value.ptr();
    }
  });
  m.def("status_string", [](int status) { return std::string(ferry_status_string(ferry_status_t(status))); });

  nb::class_<Config>(m, "Config")
      .def(nb::init<>())
      .def_prop_rw("rank", [](Config& c) { return c.c.rank; }, [](Config& c, int v) { c.c.rank = v; })
      .def_prop_rw("world_size", [](Config& c) { return c.c.world_size; }, [](Config& c, int v) { c.c.world_size = v; })
      .def_prop_rw("num_experts", [](Config& c) { return c.c.num_experts; },
                   [](Config& c, int v) { c.c.num_experts = v; })
      .def_prop_rw("experts_per_token", [](Config& c) { return c.c.experts_per_token; },
                   [](Config& c, int v) { c.c.experts_per_token = v; })
      .def_prop_rw("max_tokens_per_rank", [](Config& c) { return c.c.max_tokens_per_rank; },
                   [](Config& c, int v) { c.c.max_tokens_per_rank = v; })
      .def_prop_rw("hidden_dim", [](Config& c) { return c.c.hidden_dim; }, [](Config& c, int v) { c.c.hidden_dim = v; })
      .def_prop_rw("in_dtype", [](Config& c) { return int(c.c.in_dtype); },
                   [](Config& c, int v) { c.c.in_dtype = ferry_dtype_t(v); })
      .def_prop_rw("scale_block", [](Config& c) { return c.c.scale_block; },
                   [](Config& c, int v) { c.c.scale_block = v; })
      .def_prop_rw("out_dtype", [](Config& c) { return int(c.c.out_dtype); },
                   [](Config& c, int v) { c.c.out_dtype = ferry_dtype_t(v); })
      .def_prop_rw("expert_alignment", [](Config& c) { return c.c.expert_alignment; },
                   [](Config& c, int v) { c.c.expert_alignment = v; })
      .def_prop_rw("device", [](Config& c) { return int(c.c.device); },
                   [](Config& c, int v) { c.c.device = ferry_device_t(v); })
      .def_prop_rw("cuda_device", [](Config& c) { return c.c.cuda_device; },
                   [](Config& c, int v) { c.c.cuda_device = v; })
      .def_prop_rw("nets_per_rank", [](Config& c) { return c.c.nets_per_rank; },
                   [](Config& c, int v) { c.c.nets_per_rank = v; })
      .def_prop_rw("provider", [](Config& c) { return c.provider; },
                   [](Config& c, std::optional<std::string> v) { c.provider = std::move(v); }, nb::arg("value").none())
      .def_prop_rw("timeout_ms", [](Config& c) { return c.c.timeout_ms; }, [](Config& c, int v) { c.c.timeout_ms = v; })
      .def_prop_rw("dp_size", [](Config& c) { return c.c.dp_size; }, [](Config& c, int v) { c.c.dp_size = v; })
      .def_prop_rw("private_tokens", [](Config& c) { return c.c.private_tokens; },
                   [](Config& c, int v) { c.c.private_tokens = v; })
      .def_prop_rw("combine_weights", [](Config& c) { return int(c.c.combine_weights); },
                   [](Config& c, int v) { c.c.combine_weights = ferry_combine_weights_t(v); });

  m.def("buffer_sizes", [](Config& config) {
    ferry_buffer_sizes_t s{};
    raise_on_error(ferry_a2a_buffer_sizes(&config.get(), &s));
    return sizes_dict(s);
  });

  nb::class_<Bootstrap>(m, "Bootstrap")
      .def_static("from_env", &Bootstrap::from_env, nb::arg("timeout_ms"))
      .def_static("tcp", &Bootstrap::tcp, nb::arg("master_addr"), nb::arg("master_port"), nb::arg("rank"),
                  nb::arg("world_size"), nb::arg("timeout_ms"))
      .def_static("mpi", &Bootstrap::mpi)
      .def_static("callback", &Bootstrap::callback, nb::arg("rank"), nb::arg("world_size"), nb::arg("allgather"))
      .def_prop_ro("rank", &Bootstrap::rank)
      .def_prop_ro("world_size", &Bootstrap::world_size)
      .def("close", &Bootstrap::close)
      .def_prop_ro("closed", &Bootstrap::closed);

  nb::class_<AllToAll>(m, "AllToAll")
      .def(nb::init<Config&, nb::object>(), nb::arg("config"), nb::arg("bootstrap"))
      .def("dispatch", &AllToAll::dispatch, nb::arg("out_expert_num_tokens"), nb::arg("out_expert_x"),
           nb::arg("out_expert_x_scale"), nb::arg("dp_x"), nb::arg("dp_x_scale"), nb::arg("indices"),
           nb::arg("weights"), nb::arg("bound_m"), nb::arg("num_tokens"), nb::arg("flags"), nb::arg("stream"),
           nb::arg("quantize") = int(FERRY_QUANTIZE_NONE), nb::arg("round_scale") = false,
           nb::arg("out_scale_layout") = int(FERRY_SCALE_ROW_MAJOR), nb::arg("out_expert_src_token") = 0,
           nb::arg("out_expert_num_tokens_per_rank") = 0)
      .def("combine", &AllToAll::combine, nb::arg("out_tokens"), nb::arg("indices"), nb::arg("weights"),
           nb::arg("expert_y"), nb::arg("bound_m"), nb::arg("num_tokens"), nb::arg("accumulate"), nb::arg("flags"),
           nb::arg("stream"))
      .def("time_steps", &AllToAll::time_steps, nb::arg("out_expert_num_tokens"), nb::arg("out_expert_x"),
           nb::arg("out_expert_x_scale"), nb::arg("dp_x"), nb::arg("dp_x_scale"), nb::arg("indices"),
           nb::arg("weights"), nb::arg("num_tokens"), nb::arg("expert_y"), nb::arg("out_tokens"),
           nb::arg("iterations"), nb::arg("stream"))
      .def("buffer_sizes", &AllToAll::buffer_sizes)
      .def("stats", &AllToAll::stats)
      .def("close", &AllToAll::close)
      .def_prop_ro("closed", &AllToAll::closed)
      .def_prop_ro("last_call_ns", &AllToAll::last_call_ns);
}

// The C API: status codes from ferry::Error, a thread-local last error, bootstrap handles wrapping
// te::Bootstrap, and one Backend per ferry_a2a_t.
#include <memory>
#include <new>
#include <string>

#include "csrc/backend.h"
#include "ferry/ferry.h"
#include "transfer_engine/bootstrap.h"
#include "transfer_engine/error.h"

struct ferry_bootstrap {
  std::unique_ptr<ferry::te::Bootstrap> impl;
};

struct ferry_a2a {
  std::unique_ptr<ferry::ep::Backend> backend;
};

namespace {

thread_local std::string last_error;

template <class Fn>
ferry_status_t guard(Fn&& fn) {
  try {
    fn();
    last_error.clear();
    return FERRY_OK;
  } catch (const ferry::Error& e) {
    last_error = e.what();
    return static_cast<ferry_status_t>(e.status());
  } catch (const std::bad_alloc& e) {
    last_error = std::string("out of host memory: ") + e.what();
    return FERRY_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error = e.what();
    return FERRY_ERR_INTERNAL;
  } catch (...) {
    last_error = "unknown exception";
    return FERRY_ERR_INTERNAL;
  }
}

void require(const void* p, const char* what) {
  if (!p) ferry::raise(ferry::Status::invalid_argument, std::string(what) + " must not be NULL");
}

ferry_status_t wrap_bootstrap(std::unique_ptr<ferry::te::Bootstrap> b, ferry_bootstrap_t* out) {
  *out = new ferry_bootstrap{std::move(b)};
  return FERRY_OK;
}

}  // namespace

extern "C" {

const char* ferry_last_error(void) { return last_error.c_str(); }

const char* ferry_status_string(ferry_status_t status) {
  switch (status) {
    case FERRY_OK: return "ok";
    case FERRY_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FERRY_ERR_TIMEOUT: return "timeout";
    case FERRY_ERR_PEER_FAILED: return "peer failed";
    case FERRY_ERR_TRANSPORT: return "transport error";
    case FERRY_ERR_OUT_OF_MEMORY: return "out of memory";
    case FERRY_ERR_UNSUPPORTED: return "unsupported";
    case FERRY_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

ferry_status_t ferry_bootstrap_from_env(int timeout_ms, ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_from_env: out");
    wrap_bootstrap(ferry::te::bootstrap_from_env(timeout_ms > 0 ? timeout_ms : 60000), out);
  });
}

ferry_status_t ferry_bootstrap_tcp(const char* master_addr, int master_port, int rank, int world_size, int timeout_ms,
                                   ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_tcp: out");
    ferry::te::TcpBootstrapConfig c;
    if (master_addr && *master_addr) c.master_addr = master_addr;
    c.master_port = master_port;
    c.rank = rank;
    c.world_size = world_size;
    if (timeout_ms > 0) c.timeout_ms = timeout_ms;
    wrap_bootstrap(ferry::te::make_tcp_bootstrap(c), out);
  });
}

ferry_status_t ferry_bootstrap_mpi(ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_mpi: out");
    wrap_bootstrap(ferry::te::make_mpi_bootstrap(), out);
  });
}

ferry_status_t ferry_bootstrap_callback(int rank, int world_size, ferry_allgather_fn allgather, void* context,
                                        ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_callback: out");
    require(reinterpret_cast<const void*>(allgather), "ferry_bootstrap_callback: allgather");
    ferry::te::BootstrapCallbacks cb;
    cb.context = context;
    cb.allgather = allgather;
    cb.rank = rank;
    cb.world_size = world_size;
    wrap_bootstrap(ferry::te::make_callback_bootstrap(cb), out);
  });
}

ferry_status_t ferry_bootstrap_destroy(ferry_bootstrap_t bootstrap) {
  return guard([&] { delete bootstrap; });
}

void ferry_a2a_config_init(ferry_a2a_config_t* c) {
  if (!c) return;
  *c = ferry_a2a_config_t{};
  c->rank = 0;
  c->world_size = 1;
  c->num_experts = 1;
  c->experts_per_token = 1;
  c->max_tokens_per_rank = 1;
  c->hidden_dim = 0;
  c->in_dtype = FERRY_BF16;
  c->scale_block = 0;
  c->out_dtype = FERRY_BF16;
  c->expert_alignment = 1;
  c->device = FERRY_DEVICE_HOST;
  c->cuda_device = -1;
  c->nets_per_rank = 1;
  c->provider = nullptr;
  c->timeout_ms = 30000;
  c->dp_size = 1;
  c->private_tokens = -1;
}

ferry_status_t ferry_a2a_buffer_sizes(const ferry_a2a_config_t* config, ferry_buffer_sizes_t* out) {
  return guard([&] {
    require(config, "ferry_a2a_buffer_sizes: config");
    require(out, "ferry_a2a_buffer_sizes: out");
    *out = ferry::ep::buffer_sizes_for(*config);
  });
}

ferry_status_t ferry_a2a_create(const ferry_a2a_config_t* config, ferry_bootstrap_t bootstrap, ferry_a2a_t* out) {
  return guard([&] {
    require(config, "ferry_a2a_create: config");
    require(bootstrap, "ferry_a2a_create: bootstrap");
    require(out, "ferry_a2a_create: out");
    *out = nullptr;
    ferry::ep::make_layout(*config);
    auto a2a = std::make_unique<ferry_a2a>();
    if (config->device == FERRY_DEVICE_CUDA) {
#ifdef FERRY_CUDA_BACKEND
      a2a->backend = ferry::ep::make_cuda_backend(*config, *bootstrap->impl);
#else
      ferry::raise(ferry::Status::unsupported,
                   "ferry_a2a_create: FERRY_DEVICE_CUDA requested but libferry was built without the CUDA backend");
#endif
    } else {
      a2a->backend = ferry::ep::make_host_backend(*config, *bootstrap->impl);
    }
    *out = a2a.release();
  });
}

ferry_status_t ferry_a2a_destroy(ferry_a2a_t a2a) {
  return guard([&] { delete a2a; });
}

ferry_status_t ferry_a2a_buffer_bytes(ferry_a2a_t a2a, ferry_buffer_sizes_t* out) {
  return guard([&] {
    require(a2a, "ferry_a2a_buffer_bytes: a2a");
    require(out, "ferry_a2a_buffer_bytes: out");
    *out = a2a->backend->buffer_sizes();
  });
}

ferry_status_t ferry_a2a_dispatch(ferry_a2a_t a2a, const ferry_dispatch_args_t* args, void* stream) {
  return guard([&] {
    require(a2a, "ferry_a2a_dispatch: a2a");
    require(args, "ferry_a2a_dispatch: args");
    a2a->backend->dispatch(*args, stream);
  });
}

ferry_status_t ferry_a2a_combine(ferry_a2a_t a2a, const ferry_combine_args_t* args, void* stream) {
  return guard([&] {
    require(a2a, "ferry_a2a_combine: a2a");
    require(args, "ferry_a2a_combine: args");
    a2a->backend->combine(*args, stream);
  });
}

ferry_status_t ferry_a2a_stats(ferry_a2a_t a2a, ferry_a2a_stats_t* out) {
  return guard([&] {
    require(a2a, "ferry_a2a_stats: a2a");
    require(out, "ferry_a2a_stats: out");
    *out = a2a->backend->stats();
  });
}

}  // extern "C"

// The C API of include/ferry/ferry.h, the library's one front door: handles (live ones in a
// registry, so a destroyed or foreign handle is an error instead of a use after free), the
// thread-local last error, the checks of csrc/argcheck.h before any backend runs, the ranks'
// agreement on the config (csrc/agreement.h), and the order of a step's halves.
#include "csrc/api.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "csrc/agreement.h"
#include "csrc/argcheck.h"
#include "csrc/host/work_pool.h"
#include "csrc/backend.h"
#include "csrc/errors.h"
#include "ferry/ferry.h"
#include "transfer_engine/bootstrap.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/error.h"

namespace ferry::api {
namespace {

// ferry_status_t is the C face of ferry::Status: the numbers are defined once, here they are tied.
static_assert(int(Status::ok) == FERRY_OK && int(Status::invalid_argument) == FERRY_ERR_INVALID_ARGUMENT &&
                  int(Status::timeout) == FERRY_ERR_TIMEOUT && int(Status::peer_failed) == FERRY_ERR_PEER_FAILED &&
                  int(Status::transport) == FERRY_ERR_TRANSPORT &&
                  int(Status::out_of_memory) == FERRY_ERR_OUT_OF_MEMORY &&
                  int(Status::unsupported) == FERRY_ERR_UNSUPPORTED && int(Status::internal) == FERRY_ERR_INTERNAL,
              "ferry_status_t and ferry::Status name the same values");

thread_local std::string last_error;

struct BootstrapObject {
  std::unique_ptr<te::Bootstrap> owned;  // null when borrowed
  te::Bootstrap* bootstrap = nullptr;
};

struct A2aObject {
  // The transfer engine keeps using the bootstrap (teardown included): it lives as long as this.
  std::shared_ptr<BootstrapObject> bootstrap;
  std::string provider;        // the caller's, copied: config.provider points here
  ferry_a2a_config_t config{};  // checked and resolved
  ep::Layout layout;
  std::unique_ptr<ep::Backend> backend;
  ep::StepOrder order;
  int dispatch_num_tokens = 0;  // of this step's dispatch SEND
  std::string failure;          // why a step failed; the handle is then dead
};

// Handles are numbers issued once and never again, not addresses: looking one up never touches
// freed memory, and a handle value that comes back after its object is gone cannot name a newer
// object. The low bits say the kind, so that one kind passed for the other is named as such.
enum Kind : uintptr_t { kBootstrapKind = 1, kA2aKind = 2, kKindMask = 3 };
std::atomic<uintptr_t> next_serial{1};

const char* kind_name(uintptr_t kind) { return kind == kBootstrapKind ? "ferry_bootstrap_t" : "ferry_a2a_t"; }

std::string hex(uintptr_t v) {
  char text[32];
  std::snprintf(text, sizeof text, "%#llx", static_cast<unsigned long long>(v));
  return text;
}

template <class T, uintptr_t K>
class Registry {
 public:
  uintptr_t add(std::shared_ptr<T> object) {
    const uintptr_t value = (next_serial.fetch_add(1) << 2) | K;
    std::lock_guard<std::mutex> lock(mu_);
    live_.emplace(value, std::move(object));
    return value;
  }
  std::shared_ptr<T> find(uintptr_t value, const char* where) const {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (auto it = live_.find(value); it != live_.end()) return it->second;
    }
    refuse(value, where);
  }
  std::shared_ptr<T> remove(uintptr_t value, const char* where) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (auto it = live_.find(value); it != live_.end()) {
        std::shared_ptr<T> object = std::move(it->second);
        live_.erase(it);
        return object;
      }
    }
    refuse(value, where);
  }

 private:
  [[noreturn]] static void refuse(uintptr_t value, const char* where) {
    std::string why;
    if (value == 0) why = " is NULL";
    else if ((value & kKindMask) == K && (value >> 2) < next_serial.load())
      why = " " + hex(value) + " was destroyed already";
    else if ((value & kKindMask) != K && (value & kKindMask) != 0 && (value >> 2) < next_serial.load())
      why = " " + hex(value) + " is a " + kind_name(value & kKindMask) + ", not a " + kind_name(K);
    else
      why = " " + hex(value) + " is not a " + std::string(kind_name(K)) + " this library created";
    ep::fail(Status::invalid_argument, {-1, -1, where}, std::string(kind_name(K)) + why);
  }

  mutable std::mutex mu_;
  std::unordered_map<uintptr_t, std::shared_ptr<T>> live_;
};

// Never destroyed: handles a process leaks at exit stay as they are (a backend's teardown at exit
// would talk to peers that are gone, or to an MPI already finalized).
Registry<BootstrapObject, kBootstrapKind>& bootstraps() {
  static auto* r = new Registry<BootstrapObject, kBootstrapKind>;
  return *r;
}
Registry<A2aObject, kA2aKind>& a2as() {
  static auto* r = new Registry<A2aObject, kA2aKind>;
  return *r;
}

std::shared_ptr<BootstrapObject> find(ferry_bootstrap_t h, const char* where) {
  return bootstraps().find(reinterpret_cast<uintptr_t>(h), where);
}
std::shared_ptr<A2aObject> find(ferry_a2a_t h, const char* where) {
  return a2as().find(reinterpret_cast<uintptr_t>(h), where);
}

template <class Fn>
ferry_status_t guard(Fn&& fn) {
  try {
    fn();
    last_error.clear();
    return FERRY_OK;
  } catch (const Error& e) {
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

void require(const void* p, const char* where, const char* what) {
  if (!p) ep::fail(Status::invalid_argument, {-1, -1, where}, std::string(what) + " must not be NULL");
}

ferry_bootstrap_t add_bootstrap(std::unique_ptr<te::Bootstrap> owned, te::Bootstrap* borrowed) {
  auto object = std::make_shared<BootstrapObject>();
  object->bootstrap = owned ? owned.get() : borrowed;
  object->owned = std::move(owned);
  return reinterpret_cast<ferry_bootstrap_t>(bootstraps().add(std::move(object)));
}

// What the transfer engine will open: FERRY_PROVIDER overrides the config, whose default is the
// engine's own.
std::string engine_provider(const ferry_a2a_config_t& c) {
  if (const char* p = std::getenv("FERRY_PROVIDER"); p && *p) return p;
  if (c.provider && *c.provider) return c.provider;
  return te::EngineConfig{}.provider;
}

// This rank's own checks of a config against its bootstrap and this build.
void check_locally(const ferry_a2a_config_t& c, const te::Bootstrap& b) {
  ep::check_config(c);
  ep::check_bootstrap(c, b.rank(), b.world_size());
  if (ep::enum_value(c.device) != FERRY_DEVICE_CUDA) ep::host::host_threads(b.local_size());  // FERRY_HOST_THREADS
#ifndef FERRY_CUDA_BACKEND
  if (ep::enum_value(c.device) == FERRY_DEVICE_CUDA)
    raise(Status::unsupported, "ferry_a2a_config: device cuda, but libferry was built without the CUDA backend");
#endif
}

// Every rank's checks and the agreement on the config, before anything is built: on any problem
// every rank fails here, with the same account of what differs.
ferry_a2a_config_t agree_on_config(const ferry_a2a_config_t& config, te::Bootstrap& b) {
  const ep::Site site{b.rank(), -1, "ferry_a2a_create"};
  Status local_status = Status::ok;
  std::string local_error;
  try {
    check_locally(config, b);
  } catch (const Error& e) {
    local_status = e.status();
    local_error = e.what();
  }
  const ep::ConfigAgreement mine = ep::describe_config(config, b.rank(), engine_provider(config), local_status,
                                                       local_error);
  std::vector<uint8_t> all(size_t(b.world_size()) * ep::kAgreementBytes);
  const int timeout_ms = local_status == Status::ok ? ep::resolve_config(config).timeout_ms : FERRY_DEFAULT_TIMEOUT_MS;
  try {
    b.allgather(&mine, sizeof mine, all.data(), timeout_ms);
  } catch (const Error& e) {
    ep::fail(e.status(), site, std::string("exchanging the config with the other ranks: ") + e.what());
  }
  // A disagreement is everyone's problem, and the same status everywhere; without one, a config
  // that fails its own checks keeps that failure's status.
  const ep::AgreementOutcome agreed = ep::check_agreement(all, b.world_size(), b.rank());
  if (local_status != Status::ok)
    ep::fail(agreed.status != Status::ok ? agreed.status : local_status, site,
             local_error + (agreed.message.empty() ? "" : "; " + agreed.message));
  if (agreed.status != Status::ok) ep::fail(agreed.status, site, agreed.message);
  return ep::resolve_config(config);
}

// Names of the calls for messages, by operation and flags.
const char* call_name(bool dispatch, int flags) {
  if (flags == FERRY_SEND) return dispatch ? "dispatch SEND" : "combine SEND";
  if (flags == FERRY_RECV) return dispatch ? "dispatch RECV" : "combine RECV";
  return dispatch ? "dispatch" : "combine";
}

// One call of a step: the handle is alive, the half is the next one, the arguments are sound;
// then the backend runs, and any failure there leaves the handle dead.
template <class Args, class Check, class Run>
void step_call(ferry_a2a_t handle, const Args* args, bool dispatch, const char* where, Check&& check, Run&& run) {
  const std::shared_ptr<A2aObject> a2a = find(handle, where);
  require(args, where, "args");
  const ep::Site site{a2a->layout.rank, a2a->order.step(), call_name(dispatch, args->flags)};
  if (!a2a->failure.empty())
    ep::fail(Status::internal, site, "after a failed step; the all-to-all must be recreated (" + a2a->failure + ")");
  a2a->order.check(dispatch, args->flags, site);
  check(*a2a, site);
  try {
    run(*a2a);
  } catch (const std::exception& e) {
    a2a->failure = e.what();
    throw;
  }
  a2a->order.advance(dispatch, args->flags);
}

}  // namespace

ferry_bootstrap_t borrow_bootstrap(te::Bootstrap& bootstrap) { return add_bootstrap(nullptr, &bootstrap); }

}  // namespace ferry::api

using ferry::Status;
using ferry::api::find;
using ferry::api::guard;
using ferry::api::require;

extern "C" {

const char* ferry_last_error(void) { return ferry::api::last_error.c_str(); }

const char* ferry_status_string(ferry_status_t status) { return ferry::status_name(static_cast<Status>(status)); }

ferry_status_t ferry_bootstrap_from_env(int timeout_ms, ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_from_env", "out");
    *out = ferry::api::add_bootstrap(
        ferry::te::bootstrap_from_env(timeout_ms > 0 ? timeout_ms : FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS), nullptr);
  });
}

ferry_status_t ferry_bootstrap_tcp(const char* master_addr, int master_port, int rank, int world_size, int timeout_ms,
                                   ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_tcp", "out");
    ferry::te::TcpBootstrapConfig c;
    if (master_addr && *master_addr) c.master_addr = master_addr;
    c.master_port = master_port;
    c.rank = rank;
    c.world_size = world_size;
    c.timeout_ms = timeout_ms > 0 ? timeout_ms : FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS;
    *out = ferry::api::add_bootstrap(ferry::te::make_tcp_bootstrap(c), nullptr);
  });
}

ferry_status_t ferry_bootstrap_mpi(ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_mpi", "out");
    *out = ferry::api::add_bootstrap(ferry::te::make_mpi_bootstrap(), nullptr);
  });
}

ferry_status_t ferry_bootstrap_callback(int rank, int world_size, ferry_allgather_fn allgather, void* context,
                                        ferry_bootstrap_t* out) {
  return guard([&] {
    require(out, "ferry_bootstrap_callback", "out");
    require(reinterpret_cast<const void*>(allgather), "ferry_bootstrap_callback", "allgather");
    ferry::te::BootstrapCallbacks cb;
    cb.context = context;
    cb.allgather = allgather;
    cb.rank = rank;
    cb.world_size = world_size;
    *out = ferry::api::add_bootstrap(ferry::te::make_callback_bootstrap(cb), nullptr);
  });
}

ferry_status_t ferry_bootstrap_destroy(ferry_bootstrap_t bootstrap) {
  return guard([&] {
    if (bootstrap) ferry::api::bootstraps().remove(reinterpret_cast<uintptr_t>(bootstrap), "ferry_bootstrap_destroy");
  });
}

ferry_status_t ferry_bootstrap_rank(ferry_bootstrap_t bootstrap, int* rank) {
  return guard([&] {
    const auto b = find(bootstrap, "ferry_bootstrap_rank");
    require(rank, "ferry_bootstrap_rank", "rank");
    *rank = b->bootstrap->rank();
  });
}

ferry_status_t ferry_bootstrap_world_size(ferry_bootstrap_t bootstrap, int* world_size) {
  return guard([&] {
    const auto b = find(bootstrap, "ferry_bootstrap_world_size");
    require(world_size, "ferry_bootstrap_world_size", "world_size");
    *world_size = b->bootstrap->world_size();
  });
}

ferry_status_t ferry_bootstrap_allgather(ferry_bootstrap_t bootstrap, const void* in, size_t bytes, void* out,
                                         int timeout_ms) {
  return guard([&] {
    const auto b = find(bootstrap, "ferry_bootstrap_allgather");
    // Zero bytes is a barrier: no pointer is read, so none is needed.
    char none = 0;
    if (bytes > 0) {
      require(in, "ferry_bootstrap_allgather", "in");
      require(out, "ferry_bootstrap_allgather", "out");
    }
    b->bootstrap->allgather(bytes > 0 ? in : &none, bytes, bytes > 0 ? out : &none,
                            timeout_ms > 0 ? timeout_ms : FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS);
  });
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
  c->timeout_ms = FERRY_DEFAULT_TIMEOUT_MS;
  c->dp_size = 1;
  c->private_tokens = -1;
  c->combine_weights = FERRY_WEIGHTS_AT_DISPATCH;
}

ferry_status_t ferry_a2a_buffer_sizes(const ferry_a2a_config_t* config, ferry_buffer_sizes_t* out) {
  return guard([&] {
    require(config, "ferry_a2a_buffer_sizes", "config");
    require(out, "ferry_a2a_buffer_sizes", "out");
    *out = ferry::ep::buffer_sizes_for(*config);
  });
}

ferry_status_t ferry_a2a_create(const ferry_a2a_config_t* config, ferry_bootstrap_t bootstrap, ferry_a2a_t* out) {
  return guard([&] {
    require(out, "ferry_a2a_create", "out");
    *out = nullptr;
    require(config, "ferry_a2a_create", "config");
    auto a2a = std::make_shared<ferry::api::A2aObject>();
    a2a->bootstrap = find(bootstrap, "ferry_a2a_create");
    ferry::te::Bootstrap& b = *a2a->bootstrap->bootstrap;
    a2a->config = ferry::api::agree_on_config(*config, b);
    if (config->provider) a2a->provider = config->provider;
    a2a->config.provider = config->provider ? a2a->provider.c_str() : nullptr;
    a2a->layout = ferry::ep::make_layout(a2a->config);
    if (ferry::ep::enum_value(a2a->config.device) == FERRY_DEVICE_CUDA) {
#ifdef FERRY_CUDA_BACKEND
      a2a->backend = ferry::ep::make_cuda_backend(a2a->config, b);
#endif
    } else {
      a2a->backend = ferry::ep::make_host_backend(a2a->config, b);
    }
    *out = reinterpret_cast<ferry_a2a_t>(ferry::api::a2as().add(std::move(a2a)));
  });
}

ferry_status_t ferry_a2a_destroy(ferry_a2a_t a2a) {
  return guard([&] {
    if (a2a) ferry::api::a2as().remove(reinterpret_cast<uintptr_t>(a2a), "ferry_a2a_destroy");
  });
}

ferry_status_t ferry_a2a_buffer_bytes(ferry_a2a_t a2a, ferry_buffer_sizes_t* out) {
  return guard([&] {
    const auto h = find(a2a, "ferry_a2a_buffer_bytes");
    require(out, "ferry_a2a_buffer_bytes", "out");
    *out = h->backend->buffer_sizes();
  });
}

ferry_status_t ferry_a2a_dispatch(ferry_a2a_t a2a, const ferry_dispatch_args_t* args, void* stream) {
  return guard([&] {
    ferry::api::step_call(
        a2a, args, true, "ferry_a2a_dispatch",
        [&](ferry::api::A2aObject& h, const ferry::ep::Site& site) { ferry::ep::check_dispatch_args(h.layout, *args, site); },
        [&](ferry::api::A2aObject& h) {
          h.backend->dispatch(*args, stream);
          if (args->flags & FERRY_SEND) h.dispatch_num_tokens = args->num_tokens;
        });
  });
}

ferry_status_t ferry_a2a_combine(ferry_a2a_t a2a, const ferry_combine_args_t* args, void* stream) {
  return guard([&] {
    ferry::api::step_call(
        a2a, args, false, "ferry_a2a_combine",
        [&](ferry::api::A2aObject& h, const ferry::ep::Site& site) {
          ferry::ep::check_combine_args(h.layout, *args, h.dispatch_num_tokens, site);
        },
        [&](ferry::api::A2aObject& h) { h.backend->combine(*args, stream); });
  });
}

ferry_status_t ferry_a2a_stats(ferry_a2a_t a2a, ferry_a2a_stats_t* out) {
  return guard([&] {
    const auto h = find(a2a, "ferry_a2a_stats");
    require(out, "ferry_a2a_stats", "out");
    *out = h->backend->stats();
  });
}

}  // extern "C"

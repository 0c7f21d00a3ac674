// One libfabric NIC: fabric + domain + RDM endpoint + data CQ + table AV, each owned by RAII.
// Only the engine's worker thread calls into a Nic after construction (FI_THREAD_DOMAIN).
#pragma once
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transfer_engine/engine.h"

namespace ferry::te::fabric {

// Closes any fid-bearing libfabric object.
struct FidCloser {
  template <typename T>
  void operator()(T* object) const {
    if (object != nullptr) fi_close(&object->fid);
  }
};
template <typename T>
using FidPtr = std::unique_ptr<T, FidCloser>;

struct InfoFree {
  void operator()(fi_info* info) const { fi_freeinfo(info); }
};
using InfoPtr = std::unique_ptr<fi_info, InfoFree>;


// "tcp" -> "tcp;ofi_rxm"; "efa-direct" stays as named (libfabric >= 2 lists it as its own fabric);
// everything else passes through.
std::string libfabric_provider_name(const std::string& provider);

// Domain names the provider offers for FI_EP_RDM + RMA, in libfabric's order, without duplicates.
std::vector<std::string> list_domains(const std::string& provider);

// Text for a libfabric return code, with the call that produced it.
std::string fi_error_text(const char* call, int rc);

struct NicOptions {
  std::string provider;   // as the user named it ("tcp", "shm", "efa", ...)
  std::string domain;     // empty: the provider's first domain
  int rank = 0;           // for error messages
  int index = 0;          // NIC index within the engine, for error messages
};

// What the provider granted, which changes how the engine addresses remote memory.
struct NicCaps {
  bool virt_addr = false;   // remote addresses are virtual addresses (else offsets)
  bool prov_key = false;    // the provider chooses keys (else we request unique ones)
  size_t mr_key_size = 8;   // bytes of a key the provider accepts
  bool local_mr = false;    // descriptors are required for local buffers
  bool hmem = false;        // device memory can be registered
  size_t cq_data_size = 0;
  size_t inject_size = 0;
  size_t tx_size = 0;
  uint64_t max_msg_size = 0;
};

class Nic {
 public:
  explicit Nic(const NicOptions& options);
  Nic(const Nic&) = delete;
  Nic& operator=(const Nic&) = delete;

  const std::string& provider_name() const { return provider_name_; }
  const std::string& domain_name() const { return domain_name_; }
  const NicCaps& caps() const { return caps_; }
  const std::vector<uint8_t>& address() const { return address_; }

  // Inserts peers' addresses in order; with FI_AV_TABLE the returned fi_addr of entry i is i, which
  // lets completions name a rank without a lookup.
  std::vector<fi_addr_t> insert_addresses(const std::vector<std::vector<uint8_t>>& addresses);

  // Registers [data, data + bytes) for local use and remote writes. `requested_key` is used when the
  // provider does not choose keys.
  FidPtr<fid_mr> register_memory(void* data, size_t bytes, MemoryKind kind, int cuda_device,
                                 uint64_t requested_key);

  // One RMA write; returns fi_writemsg's code (-FI_EAGAIN means the queue is full).
  ssize_t post_write(const void* buf, size_t bytes, void* desc, fi_addr_t dest, uint64_t remote_addr,
                     uint64_t key, const uint32_t* imm, void* context, bool more);

  // Up to `max_entries` completions; returns a count >= 0, or -FI_EAVAIL when an error entry waits.
  ssize_t poll(fi_cq_data_entry* entries, size_t max_entries);
  // Reads the pending error entry; `text` gets fi_strerror + the provider's explanation.
  bool read_error(fi_cq_err_entry& entry, std::string& text);

  // The raw handles, for baselines that drive libfabric directly (ferry-te-bench's raw loop).
  fid_ep* endpoint() const { return ep_.get(); }
  fid_cq* cq() const { return cq_.get(); }

 private:
  NicOptions options_;
  InfoPtr info_;
  FidPtr<fid_fabric> fabric_;
  FidPtr<fid_domain> domain_;
  FidPtr<fid_av> av_;
  FidPtr<fid_cq> cq_;
  FidPtr<fid_ep> ep_;
  std::string provider_name_;
  std::string domain_name_;
  NicCaps caps_;
  std::vector<uint8_t> address_;
  std::vector<char> error_data_;
};

}  // namespace ferry::te::fabric

#include "transfer_engine/fabric/nic.h"
#include "transfer_engine/fabric/shm_names.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <mutex>
#include <set>

#ifdef FERRY_HAVE_CUDA
#include "transfer_engine/cuda_driver.h"
#endif

namespace ferry::te::fabric {
namespace {

constexpr uint32_t kApiVersion = FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION);
constexpr uint64_t kBaseCaps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE;

// FI_PROVIDER filters the providers libfabric loads at its first call; a stray value left by a
// launcher would hide the provider the engine was configured for, so it is dropped before libfabric
// initialises (FERRY_PROVIDER is the engine's own override).
void forget_fi_provider_filter() {
  static std::once_flag once;
  std::call_once(once, [] { unsetenv("FI_PROVIDER"); });
}

// Owns the strings libfabric frees with the hints.
InfoPtr make_hints(const std::string& provider, const std::string& domain, uint64_t caps) {
  InfoPtr hints(fi_allocinfo());
  if (!hints) raise(Status::out_of_memory, "fi_allocinfo failed");
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = caps;
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  hints->domain_attr->mr_mode =
      FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_HMEM;
  hints->domain_attr->threading = FI_THREAD_DOMAIN;
  hints->domain_attr->resource_mgmt = FI_RM_ENABLED;
  if (provider == "efa-direct") {
    // libfabric >= 2 exposes efa-direct as a fabric of the efa provider.
    hints->fabric_attr->prov_name = strdup("efa");
    hints->fabric_attr->name = strdup("efa-direct");
  } else {
    hints->fabric_attr->prov_name = strdup(libfabric_provider_name(provider).c_str());
  }
  if (!domain.empty()) hints->domain_attr->name = strdup(domain.c_str());
  return hints;
}

// Tries the richest capability set first and falls back: FI_HMEM and FI_RMA_EVENT are wanted where
// offered, never required.
InfoPtr get_info(const std::string& provider, const std::string& domain, int& last_rc) {
  forget_fi_provider_filter();
  const uint64_t attempts[] = {kBaseCaps | FI_HMEM | FI_RMA_EVENT, kBaseCaps | FI_HMEM,
                               kBaseCaps | FI_RMA_EVENT, kBaseCaps};
  for (uint64_t caps : attempts) {
    InfoPtr hints = make_hints(provider, domain, caps);
    fi_info* list = nullptr;
    last_rc = fi_getinfo(kApiVersion, nullptr, nullptr, 0, hints.get(), &list);
    if (last_rc != 0 || list == nullptr) continue;
    InfoPtr all(list);
    // The layered tcp;ofi_rxm does not always filter by domain name, so match it here; among the
    // matches prefer IPv4 (tcp lists IPv4 and IPv6 fabrics for the same interface).
    fi_info* chosen = nullptr;
    int best = -1;
    for (fi_info* it = list; it != nullptr; it = it->next) {
      const char* name = it->domain_attr->name;
      if (!domain.empty() && (name == nullptr || domain != name)) continue;
      const int score = it->addr_format == FI_SOCKADDR_IN ? 1 : 0;
      if (score > best) {
        best = score;
        chosen = it;
      }
    }
    if (chosen == nullptr) continue;
    InfoPtr copy(fi_dupinfo(chosen));
    if (!copy) raise(Status::out_of_memory, "fi_dupinfo failed");
    return copy;
  }
  return nullptr;
}

}  // namespace

std::string libfabric_provider_name(const std::string& provider) {
  if (provider == "tcp") return "tcp;ofi_rxm";
  if (provider == "verbs") return "verbs;ofi_rxm";
  return provider;
}

std::vector<std::string> list_domains(const std::string& provider) {
  forget_fi_provider_filter();
  InfoPtr hints = make_hints(provider, "", kBaseCaps);
  fi_info* list = nullptr;
  std::vector<std::string> names;
  if (fi_getinfo(kApiVersion, nullptr, nullptr, 0, hints.get(), &list) != 0) return names;
  InfoPtr all(list);
  std::set<std::string> seen;
  for (fi_info* it = list; it != nullptr; it = it->next) {
    std::string name = it->domain_attr->name ? it->domain_attr->name : "";
    if (seen.insert(name).second) names.push_back(name);
  }
  return names;
}

std::string fi_error_text(const char* call, int rc) {
  return std::string(call) + " failed: " + fi_strerror(rc < 0 ? -rc : rc) + " (" +
         std::to_string(rc) + ")";
}

Nic::Nic(const NicOptions& options) : options_(options) {
  const std::string where = "rank " + std::to_string(options.rank) + " NIC " +
                            std::to_string(options.index) + " (provider " + options.provider +
                            (options.domain.empty() ? "" : ", domain " + options.domain) + ")";
  int rc = 0;
  info_ = get_info(options.provider, options.domain, rc);
  if (!info_) {
    raise(Status::unsupported,
          where + ": no FI_EP_RDM endpoint with FI_RMA and remote writes: " +
              fi_error_text("fi_getinfo", rc) +
              ". Check the provider name (efa, efa-direct, tcp, shm) and the domain/interface "
              "name (fi_info -p <provider> lists them).");
  }
  provider_name_ = info_->fabric_attr->prov_name ? info_->fabric_attr->prov_name : options.provider;
  domain_name_ = info_->domain_attr->name ? info_->domain_attr->name : "";
  const uint64_t mr_mode = info_->domain_attr->mr_mode;
  caps_.virt_addr = (mr_mode & FI_MR_VIRT_ADDR) != 0;
  caps_.prov_key = (mr_mode & FI_MR_PROV_KEY) != 0;
  if (info_->domain_attr->mr_key_size > 0) caps_.mr_key_size = info_->domain_attr->mr_key_size;
  caps_.local_mr = (mr_mode & FI_MR_LOCAL) != 0;
  caps_.hmem = (info_->caps & FI_HMEM) != 0;
  caps_.cq_data_size = info_->domain_attr->cq_data_size;
  caps_.inject_size = info_->tx_attr->inject_size;
  caps_.tx_size = info_->tx_attr->size;
  caps_.max_msg_size = info_->ep_attr->max_msg_size;
  // EFA carries 4 bytes of remote CQ data; immediates never rely on more.
  if (caps_.cq_data_size < sizeof(uint32_t)) {
    raise(Status::unsupported, where + ": remote CQ data is " + std::to_string(caps_.cq_data_size) +
                                   " bytes, 32-bit immediates need at least 4");
  }

  fid_fabric* fabric = nullptr;
  if ((rc = fi_fabric(info_->fabric_attr, &fabric, nullptr)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_fabric", rc));
  fabric_.reset(fabric);
  fid_domain* domain = nullptr;
  if ((rc = fi_domain(fabric_.get(), info_.get(), &domain, nullptr)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_domain", rc));
  domain_.reset(domain);

  fi_av_attr av_attr{};
  av_attr.type = FI_AV_TABLE;
  fid_av* av = nullptr;
  if ((rc = fi_av_open(domain_.get(), &av_attr, &av, nullptr)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_av_open", rc));
  av_.reset(av);

  fi_cq_attr cq_attr{};
  cq_attr.format = FI_CQ_FORMAT_DATA;
  cq_attr.wait_obj = FI_WAIT_NONE;
  fid_cq* cq = nullptr;
  if ((rc = fi_cq_open(domain_.get(), &cq_attr, &cq, nullptr)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_cq_open", rc));
  cq_.reset(cq);

  fid_ep* ep = nullptr;
  if ((rc = fi_endpoint(domain_.get(), info_.get(), &ep, nullptr)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_endpoint", rc));
  ep_.reset(ep);
  if ((rc = fi_ep_bind(ep_.get(), &av_->fid, 0)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_ep_bind(av)", rc));
  if ((rc = fi_ep_bind(ep_.get(), &cq_->fid, FI_TRANSMIT | FI_RECV)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_ep_bind(cq)", rc));

#if FI_VERSION_GE(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), FI_VERSION(1, 18))
  // Ferry moves same-host bytes itself (CUDA IPC) and the CUDA backend owns every CUDA call on its
  // streams; libfabric's own shm path and CUDA calls would compete with both.
  bool permitted = false;
  rc = fi_setopt(&ep_->fid, FI_OPT_ENDPOINT, FI_OPT_SHARED_MEMORY_PERMITTED, &permitted,
                 sizeof(permitted));
  if (rc != 0 && rc != -FI_ENOPROTOOPT && rc != -FI_ENOSYS)
    raise(Status::transport, where + ": " + fi_error_text("fi_setopt(SHARED_MEMORY_PERMITTED)", rc));
  rc = fi_setopt(&ep_->fid, FI_OPT_ENDPOINT, FI_OPT_CUDA_API_PERMITTED, &permitted,
                 sizeof(permitted));
  if (rc != 0 && rc != -FI_ENOPROTOOPT && rc != -FI_ENOSYS)
    raise(Status::transport, where + ": " + fi_error_text("fi_setopt(CUDA_API_PERMITTED)", rc));
#endif

  if (provider_name_ == "shm") {
    // shm names its shared-memory region after the pid by default. A killed process leaves its region
    // behind, and with pid_max at 32768 a later process soon reuses the pid and fails fi_enable with
    // EBUSY; a random suffix keeps every endpoint's region distinct.
    const std::string name = shm_endpoint_name(options_.index);
    if ((rc = fi_setname(&ep_->fid, const_cast<char*>(name.c_str()), name.size() + 1)) != 0)
      raise(Status::transport, where + ": " + fi_error_text("fi_setname", rc) + " for " + name);
  }
  if ((rc = fi_enable(ep_.get())) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_enable", rc));

  size_t addrlen = 0;
  fi_getname(&ep_->fid, nullptr, &addrlen);
  address_.resize(addrlen);
  if ((rc = fi_getname(&ep_->fid, address_.data(), &addrlen)) != 0)
    raise(Status::transport, where + ": " + fi_error_text("fi_getname", rc));
  address_.resize(addrlen);
  error_data_.resize(256);
}

std::vector<fi_addr_t> Nic::insert_addresses(const std::vector<std::vector<uint8_t>>& addresses) {
  std::vector<fi_addr_t> result(addresses.size(), FI_ADDR_UNSPEC);
  for (size_t i = 0; i < addresses.size(); ++i) {
    int rc = fi_av_insert(av_.get(), addresses[i].data(), 1, &result[i], 0, nullptr);
    if (rc != 1) {
      raise(Status::transport, "rank " + std::to_string(options_.rank) + " NIC " +
                                   std::to_string(options_.index) + ": fi_av_insert of rank " +
                                   std::to_string(i) + "'s address failed: " +
                                   fi_error_text("fi_av_insert", rc < 0 ? rc : -FI_EINVAL));
    }
  }
  return result;
}

FidPtr<fid_mr> Nic::register_memory(void* data, size_t bytes, MemoryKind kind, int cuda_device,
                                    uint64_t requested_key) {
  const std::string where = "rank " + std::to_string(options_.rank) + " NIC " +
                            std::to_string(options_.index) + " (" + provider_name_ + ")";
  iovec iov{data, bytes};
  fi_mr_attr attr{};
  attr.mr_iov = &iov;
  attr.iov_count = 1;
  attr.access = FI_WRITE | FI_REMOTE_WRITE;
  attr.requested_key = requested_key;
  attr.iface = FI_HMEM_SYSTEM;
  uint64_t flags = 0;
  int dmabuf_fd = -1;
  if (kind == MemoryKind::cuda) {
#ifdef FERRY_HAVE_CUDA
    if (!caps_.hmem) {
      raise(Status::unsupported,
            where + ": provider does not report FI_HMEM, so CUDA memory cannot be registered; "
                    "use pinned host memory (host-staged transfers) with this provider");
    }
    // The NIC would fault on a host pointer tagged as device memory; say so here instead.
    const CudaDriver* cu = cuda_driver();
    if (!cu) {
      raise(Status::unsupported, where + ": CUDA driver unavailable (" +
                                     std::string(cuda_driver_error()) +
                                     "); cannot register CUDA memory");
    }
    if (CUresult rc = cu->init(0); rc != CUDA_SUCCESS) {
      const char* text = nullptr;
      cu->get_error_string(rc, &text);
      raise(Status::unsupported, where + ": CUDA driver unavailable (" +
                                     std::string(text ? text : "unknown") +
                                     "); cannot register CUDA memory");
    }
    unsigned int memory_type = 0;
    if (cu->pointer_get_attribute(&memory_type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                              reinterpret_cast<CUdeviceptr>(data)) != CUDA_SUCCESS ||
        memory_type != CU_MEMORYTYPE_DEVICE) {
      raise(Status::invalid_argument,
            where + ": registering as CUDA memory a pointer that is not device memory");
    }
    attr.iface = FI_HMEM_CUDA;
    attr.device.cuda = cuda_device;
#if FI_VERSION_GE(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), FI_VERSION(1, 20))
    // dmabuf lets the NIC map GPU pages without the nvidia-peermem kernel module.
    const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t base = reinterpret_cast<uintptr_t>(data) & ~(page - 1);
    const size_t span = ((reinterpret_cast<uintptr_t>(data) + bytes + page - 1) & ~(page - 1)) - base;
    int fd = -1;
    if (cu->mem_get_handle_for_address_range &&
        cu->mem_get_handle_for_address_range(&fd, static_cast<CUdeviceptr>(base), span,
                                             CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                                             0) == CUDA_SUCCESS) {
      dmabuf_fd = fd;
    }
    fi_mr_dmabuf dmabuf{};
    if (dmabuf_fd >= 0) {
      dmabuf.fd = dmabuf_fd;
      dmabuf.offset = reinterpret_cast<uintptr_t>(data) - base;
      dmabuf.len = bytes;
      dmabuf.base_addr = reinterpret_cast<void*>(base);
      attr.dmabuf = &dmabuf;
      flags |= FI_MR_DMABUF;
    }
#endif
#else
    raise(Status::unsupported, where + ": built without CUDA; cannot register CUDA memory");
#endif
  }
  fid_mr* mr = nullptr;
  int rc = fi_mr_regattr(domain_.get(), &attr, flags, &mr);
  if (dmabuf_fd >= 0) close(dmabuf_fd);
  if (rc != 0) {
    raise(rc == -FI_ENOSYS || rc == -FI_EOPNOTSUPP ? Status::unsupported : Status::transport,
          where + ": registering " + std::to_string(bytes) + " bytes of " +
              (kind == MemoryKind::cuda ? "CUDA" : "host") + " memory: " +
              fi_error_text("fi_mr_regattr", rc));
  }
  return FidPtr<fid_mr>(mr);
}

ssize_t Nic::post_write(const void* buf, size_t bytes, void* desc, fi_addr_t dest,
                        uint64_t remote_addr, uint64_t key, const uint32_t* imm, void* context,
                        bool more) {
  iovec iov{const_cast<void*>(buf), bytes};
  fi_rma_iov rma_iov{remote_addr, bytes, key};
  fi_msg_rma msg{};
  msg.msg_iov = &iov;
  msg.desc = &desc;
  msg.iov_count = 1;
  msg.addr = dest;
  msg.rma_iov = &rma_iov;
  msg.rma_iov_count = 1;
  msg.context = context;
  uint64_t flags = FI_COMPLETION;
  if (imm != nullptr) {
    msg.data = *imm;
    flags |= FI_REMOTE_CQ_DATA;
  }
  if (more) flags |= FI_MORE;
  return fi_writemsg(ep_.get(), &msg, flags);
}

ssize_t Nic::poll(fi_cq_data_entry* entries, size_t max_entries) {
  ssize_t n = fi_cq_read(cq_.get(), entries, max_entries);
  if (n == -FI_EAGAIN) return 0;
  return n;
}

bool Nic::read_error(fi_cq_err_entry& entry, std::string& text) {
  entry = fi_cq_err_entry{};
  entry.err_data = error_data_.data();
  entry.err_data_size = error_data_.size();
  ssize_t rc = fi_cq_readerr(cq_.get(), &entry, 0);
  if (rc <= 0) return false;
  char buffer[256] = {};
  const char* detail =
      fi_cq_strerror(cq_.get(), entry.prov_errno, entry.err_data, buffer, sizeof(buffer));
  text = std::string(fi_strerror(entry.err)) + " (" + (detail ? detail : "") + ")";
  return true;
}

}  // namespace ferry::te::fabric

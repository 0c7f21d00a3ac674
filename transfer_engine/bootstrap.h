// Rendezvous and nothing else: allgather and barrier of byte blobs among the ranks of one job.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace ferry::te {

class Bootstrap {
 public:
  virtual ~Bootstrap() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Ranks on the same host, numbered 0..local_size-1 (from LOCAL_RANK, the MPI environment, or
  // derived from host names during construction).
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  // Every rank contributes `bytes` bytes from `in`; `out` receives world_size * bytes, rank-major.
  // Throws ferry::Error(Status::timeout) naming the ranks that did not arrive within timeout_ms.
  virtual void allgather(const void* in, size_t bytes, void* out, int timeout_ms) = 0;
  virtual void barrier(int timeout_ms);
};

struct TcpBootstrapConfig {
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int rank = 0;
  int world_size = 1;
  int local_rank = -1;  // -1: derive from host names
  int timeout_ms = 60000;
  int local_size = -1;  // -1: derive from host names (LOCAL_WORLD_SIZE in bootstrap_from_env)
  // The job's secret, the same on every rank. Empty: FERRY_JOB_KEY, else a key derived from
  // master_port and the launcher's job id in the environment (launch_env.h, job_key_source).
  std::string job_key;
  // The local address rank 0 listens on. Empty: FERRY_BOOTSTRAP_BIND_ADDR, else every address
  // master_addr resolves to, each of which must belong to this host ("0.0.0.0" or "::" listen on
  // every interface: for a master_addr that reaches rank 0 through NAT or a proxy).
  std::string bind_addr;
};

// Rank 0 listens on master_addr:master_port; the others connect (retrying until the deadline).
// Every connection proves the job key before it is trusted (bootstrap_wire.h); one that does not,
// or that idles past its handshake deadline, is closed without affecting the job.
std::unique_ptr<Bootstrap> make_tcp_bootstrap(const TcpBootstrapConfig& config);

// MPI_COMM_WORLD (only when built with MPI; throws Status::unsupported otherwise). Calls MPI_Init if
// MPI is not initialised yet, and MPI_Finalize on destruction in that case.
std::unique_ptr<Bootstrap> make_mpi_bootstrap();

// A serving stack passes its own process group: allgather must behave as Bootstrap::allgather and
// return 0 on success.
struct BootstrapCallbacks {
  void* context = nullptr;
  int (*allgather)(void* context, const void* in, size_t bytes, void* out) = nullptr;
  int rank = 0;
  int world_size = 1;
  int local_rank = -1;
  int local_size = -1;
};
std::unique_ptr<Bootstrap> make_callback_bootstrap(const BootstrapCallbacks& callbacks);

// The launcher's environment (launch_env.h: torchrun, mpirun, PMI/PMIx, srun). With a rendezvous
// (MASTER_ADDR and MASTER_PORT, or srun's first node and job port) over TCP with the launcher's
// rank and world size; else an MPI launch over MPI; else a world of one; else throws
// Status::invalid_argument saying which variables are missing.
std::unique_ptr<Bootstrap> bootstrap_from_env(int timeout_ms = 60000);

}  // namespace ferry::te

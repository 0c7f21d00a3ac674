// MPI bootstrap: the job's MPI_COMM_WORLD, for launches by mpirun or srun.
#include <chrono>
#include <climits>
#include <exception>
#include <string>
#include <thread>

#include "transfer_engine/bootstrap.h"
#include "transfer_engine/error.h"

#ifdef FERRY_HAVE_MPI
// Only the C API is linked (MPI::MPI_C); keep mpi.h from pulling in the deprecated C++ bindings.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif

namespace ferry::te {

#ifdef FERRY_HAVE_MPI
namespace {

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(len));
}

class MpiBootstrap final : public Bootstrap {
 public:
  MpiBootstrap() {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (finalized) {
      raise(Status::invalid_argument, "mpi bootstrap: MPI_Finalize was already called");
    }
    if (!initialized) {
      int provided = 0;
      // The engine worker never calls MPI, so one calling thread at a time is all we need.
      int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
      if (rc != MPI_SUCCESS)
        raise(Status::transport, "mpi bootstrap: MPI_Init_thread: " + mpi_error_text(rc));
      owns_mpi_ = true;
    }
    // A private communicator: our collectives never match the application's, and errors are
    // returned to us instead of aborting the job.
    check(MPI_Comm_dup(MPI_COMM_WORLD, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &world_size_), "MPI_Comm_size");
    MPI_Comm local = MPI_COMM_NULL;
    check(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local),
          "MPI_Comm_split_type");
    MPI_Comm_rank(local, &local_rank_);
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_free(&local);
  }

  ~MpiBootstrap() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    // After a timed-out collective the request is still pending and MPI cannot cancel it; freeing
    // the communicator or finalizing would then block forever, so a broken bootstrap leaks both.
    // The same holds when an error is leaving the rank: a peer that stopped answering would keep
    // MPI_Finalize waiting, and the error unprinted; mpirun ends a job whose rank left without it.
    if (broken_ || std::uncaught_exceptions() > 0) return;
    MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }

  void allgather(const void* in, size_t bytes, void* out, int timeout_ms) override {
    if (broken_) {
      raise(Status::internal, prefix() + "unusable after an earlier timed-out allgather");
    }
    if (bytes > static_cast<size_t>(INT_MAX)) {
      raise(Status::invalid_argument,
            prefix() + "allgather of " + std::to_string(bytes) + " bytes exceeds MPI's int count");
    }
    // The non-blocking collective lets us keep a deadline that MPI_Allgather cannot.
    MPI_Request request = MPI_REQUEST_NULL;
    int count = static_cast<int>(bytes);
    check(MPI_Iallgather(in, count, MPI_BYTE, out, count, MPI_BYTE, comm_, &request),
          "MPI_Iallgather");
    auto start = std::chrono::steady_clock::now();
    auto deadline = start + std::chrono::milliseconds(timeout_ms);
    int done = 0;
    auto pause = std::chrono::microseconds(1);
    for (;;) {
      check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (done) return;
      if (std::chrono::steady_clock::now() >= deadline) {
        broken_ = true;
        raise(Status::timeout, prefix() + "MPI_Iallgather of " + std::to_string(bytes) +
                                   " bytes did not complete within " + std::to_string(timeout_ms) +
                                   " ms (MPI does not say which of the " +
                                   std::to_string(world_size_) + " ranks is missing)");
      }
      // Back off so oversubscribed ranks leave the core to the peers they are waiting for.
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }

 private:
  std::string prefix() const { return "mpi bootstrap rank " + std::to_string(rank_) + ": "; }

  void check(int rc, const char* what) {
    if (rc != MPI_SUCCESS) raise(Status::transport, prefix() + what + ": " + mpi_error_text(rc));
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owns_mpi_ = false;
  bool broken_ = false;
  int rank_ = 0;
  int world_size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
};

}  // namespace

std::unique_ptr<Bootstrap> make_mpi_bootstrap() {
  return std::make_unique<MpiBootstrap>();
}

#else

std::unique_ptr<Bootstrap> make_mpi_bootstrap() {
  raise(Status::unsupported,
        "mpi bootstrap: Ferry was built without MPI (FERRY_MPI=OFF or no MPI found)");
}

#endif

}  // namespace ferry::te

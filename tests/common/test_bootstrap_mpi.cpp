// The MPI bootstrap under a real mpirun launch (registered with ctest as `mpirun -np 4 ...`).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "transfer_engine/bootstrap.h"
#include "transfer_engine/error.h"

namespace ferry::te {
namespace {

bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_RANK") || std::getenv("PMI_RANK") || std::getenv("PMIX_RANK");
}

// One bootstrap for the whole process: MPI can be initialised only once.
Bootstrap& mpi() {
  static std::unique_ptr<Bootstrap> bootstrap = bootstrap_from_env(30000);
  return *bootstrap;
}

TEST(MpiBootstrap, RanksAndLocalRanksComeFromMpi) {
  if (!launched_by_mpi()) GTEST_SKIP() << "not launched by mpirun; ctest runs this under mpirun";
  Bootstrap& b = mpi();
  EXPECT_EQ(b.rank(), std::atoi(std::getenv("OMPI_COMM_WORLD_RANK") ?: "-1"));
  EXPECT_GE(b.world_size(), 2);
  // mpirun places every rank on this one machine.
  EXPECT_EQ(b.local_size(), b.world_size());
  EXPECT_EQ(b.local_rank(), b.rank());
}

TEST(MpiBootstrap, AllgatherDeliversEveryBlobByteForByte) {
  if (!launched_by_mpi()) GTEST_SKIP() << "not launched by mpirun; ctest runs this under mpirun";
  Bootstrap& b = mpi();
  const int world = b.world_size();
  for (size_t bytes : {size_t{1}, size_t{1000}, size_t{1} << 20}) {
    std::vector<uint8_t> mine(bytes), all(bytes * world, 0xEE);
    for (size_t i = 0; i < bytes; ++i) mine[i] = static_cast<uint8_t>(b.rank() * 31 + i * 7);
    b.allgather(mine.data(), bytes, all.data(), 30000);
    for (int r = 0; r < world; ++r) {
      for (size_t i = 0; i < bytes; ++i) {
        ASSERT_EQ(all[r * bytes + i], static_cast<uint8_t>(r * 31 + i * 7))
            << "block of rank " << r << ", byte " << i;
      }
    }
  }
  b.barrier(30000);
}

}  // namespace
}  // namespace ferry::te

// The one launcher-environment reader (torchrun, Open MPI, PMI/PMIx, Slurm) that
// bootstrap_from_env and the tools share, and the job key it derives.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <optional>
#include <string>

#include "tests/common/error_of.h"
#include "transfer_engine/error.h"
#include "transfer_engine/launch_env.h"

namespace ferry::te {
namespace {

using testing::error_of;

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;

TEST(LaunchEnv, SlurmWithoutMpiGivesRanksAndARendezvousEveryRankAgreesOn) {
  EnvVars vars{{"SLURM_PROCID", "5"},         {"SLURM_NTASKS", "8"},
               {"SLURM_LOCALID", "1"},        {"SLURM_TASKS_PER_NODE", "4(x2)"},
               {"SLURM_JOB_ID", "4242"},      {"SLURM_STEP_ID", "0"},
               {"SLURM_STEP_NODELIST", "gpu[07-08]"}};
  const LaunchEnv env = read_launch_env(vars);
  EXPECT_EQ(env.launcher, Launcher::slurm);
  EXPECT_EQ(env.rank, 5);
  EXPECT_EQ(env.world_size, 8);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.local_size, 4);
  EXPECT_EQ(env.master_addr, "gpu07");
  EXPECT_TRUE(env.has_master());
  EXPECT_EQ(env.job_id, "SLURM_JOB_ID=4242 SLURM_STEP_ID=0");
  vars["SLURM_PROCID"] = "0";
  vars["SLURM_LOCALID"] = "0";
  EXPECT_EQ(read_launch_env(vars).master_port, env.master_port);
}

TEST(LaunchEnv, TorchrunInsideASlurmJobIsTorchrun) {
  const LaunchEnv env = read_launch_env({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"},
                                         {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "n1"},
                                         {"MASTER_PORT", "29500"}, {"SLURM_PROCID", "0"},
                                         {"SLURM_NTASKS", "1"}, {"SLURM_JOB_ID", "7"},
                                         {"TORCHELASTIC_RUN_ID", "job-a"}});
  EXPECT_EQ(env.launcher, Launcher::torchrun);
  EXPECT_EQ(env.rank, 3);
  EXPECT_EQ(env.local_size, 2);
  EXPECT_EQ(env.job_id, "TORCHELASTIC_RUN_ID=job-a");
}

TEST(LaunchEnv, ValuesThatDoNotFitNameTheVariableAndItsValue) {
  auto error = error_of([] { read_launch_env({{"RANK", "2"}, {"WORLD_SIZE", "2"}}); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), AllOf(HasSubstr("RANK='2'"), HasSubstr("outside [0, 2)")));
  error = error_of([] {
    read_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}});
  });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("MASTER_PORT='70000'"));
  error = error_of([] { read_launch_env({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "x"}}); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("OMPI_COMM_WORLD_SIZE='x'"));
  error = error_of([] { read_launch_env({{"RANK", "0"}, {"WORLD_SIZE", "33554432"}}); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("WORLD_SIZE='33554432'"));
  error = error_of([] {
    read_launch_env({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}});
  });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("local rank 2"));
}

TEST(LaunchEnv, TheRendezvousPortAvoidsTorchrunsStoreAndFerryBootstrapPortWins) {
  EnvVars vars{{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "n1"}, {"MASTER_PORT", "29500"}};
  EXPECT_EQ(read_launch_env(vars).master_port, 29500) << "plain RANK/WORLD_SIZE: nobody else holds MASTER_PORT";
  vars["TORCHELASTIC_RUN_ID"] = "run-1";
  EXPECT_EQ(read_launch_env(vars).master_port, 29501);
  vars["FERRY_BOOTSTRAP_PORT"] = "31000";
  EXPECT_EQ(read_launch_env(vars).master_port, 31000);
  vars["FERRY_BOOTSTRAP_PORT"] = "0";
  auto error = error_of([&] { read_launch_env(vars); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("FERRY_BOOTSTRAP_PORT='0'"));
  vars.erase("FERRY_BOOTSTRAP_PORT");
  vars["MASTER_PORT"] = "65535";
  error = error_of([&] { read_launch_env(vars); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("FERRY_BOOTSTRAP_PORT"));
}

TEST(JobKeySource, AnExplicitKeyWinsAndTheDerivedOneFollowsTheLauncher) {
  const auto explicit_key = job_key_source({{"FERRY_JOB_KEY", "s3cret"}, {"SLURM_JOB_ID", "1"}}, 29500);
  EXPECT_TRUE(explicit_key.explicit_key);
  EXPECT_EQ(explicit_key.description, "FERRY_JOB_KEY");
  EXPECT_THAT(explicit_key.description, Not(HasSubstr("s3cret"))) << "messages never show the key";

  const auto a = job_key_source({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RUN_ID", "a"}}, 29500);
  const auto b = job_key_source({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RUN_ID", "a"}}, 29500);
  const auto c = job_key_source({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RUN_ID", "b"}}, 29500);
  const auto d = job_key_source({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RUN_ID", "a"}}, 29501);
  EXPECT_EQ(a.material, b.material) << "every rank of one job derives the same key";
  EXPECT_NE(a.material, c.material) << "another run of torchrun is another job";
  EXPECT_NE(a.material, d.material);
  EXPECT_THAT(a.description, HasSubstr("TORCHELASTIC_RUN_ID=a"));
  // Slurm variables seen by some ranks only (torchrun started over ssh inside an allocation) do
  // not split the job.
  const auto e = job_key_source({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"TORCHELASTIC_RUN_ID", "a"},
                                 {"SLURM_JOB_ID", "77"}},
                                29500);
  EXPECT_EQ(a.material, e.material);
  const auto mpi = job_key_source({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_MCA_ess_base_jobid", "991"}}, 1);
  EXPECT_THAT(mpi.description, HasSubstr("OMPI_MCA_ess_base_jobid=991"));
}

}  // namespace
}  // namespace ferry::te

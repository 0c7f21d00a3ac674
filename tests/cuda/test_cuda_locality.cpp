// Which peers the CUDA backend reaches through CUDA IPC and which through the engine: decided from
// what every rank reports (node, GPU, wish), the same way on every rank. Runs without a GPU.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "csrc/cuda/locality.h"
#include "transfer_engine/error.h"

namespace ferry::cuda {
namespace {

// Sets an environment variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

NodeIdentity rank_on(const char* node, const std::string& bus, bool wants_ipc = true) {
  ScopedEnv env("FERRY_NODE_ID", node);
  return make_node_identity(wants_ipc, bus);
}

std::vector<uint8_t> everyone_reaches(int R) { return std::vector<uint8_t>(size_t(R) * R, 1); }

TEST(PeerPaths, OneNodeWhereEveryGpuReachesEveryOtherIsAllIpc) {
  std::vector<NodeIdentity> nodes;
  for (int r = 0; r < 4; ++r) nodes.push_back(rank_on("a", "0000:1" + std::to_string(r) + ":00.0"));
  const PeerPaths p = decide_peer_paths(nodes, everyone_reaches(4));
  EXPECT_TRUE(p.any_ipc);
  EXPECT_FALSE(p.any_engine);
  EXPECT_EQ(p.ipc_peers_of(2), (std::vector<int32_t>{0, 1, 2, 3}));
}

TEST(PeerPaths, TwoNodesAreIpcWithinAndEngineAcross) {
  std::vector<NodeIdentity> nodes;
  for (int r = 0; r < 4; ++r) nodes.push_back(rank_on(r < 2 ? "a" : "b", "0000:1" + std::to_string(r % 2) + ":00.0"));
  const PeerPaths p = decide_peer_paths(nodes, everyone_reaches(4));
  EXPECT_TRUE(p.any_ipc);
  EXPECT_TRUE(p.any_engine);
  EXPECT_TRUE(p.is_ipc(0, 1));
  EXPECT_TRUE(p.is_ipc(3, 2));
  EXPECT_FALSE(p.is_ipc(1, 2));
  EXPECT_FALSE(p.is_ipc(0, 3));
  EXPECT_EQ(p.ipc_peers_of(0), (std::vector<int32_t>{0, 1}));
  EXPECT_EQ(p.ipc_peers_of(3), (std::vector<int32_t>{2, 3}));
}

TEST(PeerPaths, OneNodePerRankUsesTheEngineOnly) {
  std::vector<NodeIdentity> nodes = {rank_on("a", "0000:10:00.0"), rank_on("b", "0000:10:00.0"),
                                     rank_on("c", "0000:10:00.0")};
  const PeerPaths p = decide_peer_paths(nodes, everyone_reaches(3));
  EXPECT_FALSE(p.any_ipc);
  EXPECT_TRUE(p.any_engine);
  EXPECT_TRUE(p.ipc_peers_of(1).empty()) << "without IPC in the job a rank does not even copy to itself by IPC";
}

TEST(PeerPaths, ARankThatRefusesIpcIsReachedThroughTheEngineByEveryone) {
  std::vector<NodeIdentity> nodes = {rank_on("a", "0000:10:00.0"), rank_on("a", "0000:11:00.0", false),
                                     rank_on("a", "0000:12:00.0")};
  const PeerPaths p = decide_peer_paths(nodes, everyone_reaches(3));
  EXPECT_TRUE(p.is_ipc(0, 2));
  EXPECT_FALSE(p.is_ipc(0, 1));
  EXPECT_FALSE(p.is_ipc(1, 2));
  EXPECT_TRUE(p.any_ipc && p.any_engine);
  EXPECT_EQ(p.ipc_peers_of(1), (std::vector<int32_t>{1}));
}

TEST(PeerPaths, OneWayPeerAccessIsNotEnough) {
  std::vector<NodeIdentity> nodes = {rank_on("a", "0000:10:00.0"), rank_on("a", "0000:11:00.0")};
  std::vector<uint8_t> reach = everyone_reaches(2);
  reach[1 * 2 + 0] = 0;  // rank 1's GPU cannot map rank 0's memory
  const PeerPaths p = decide_peer_paths(nodes, reach);
  EXPECT_FALSE(p.is_ipc(0, 1));
  EXPECT_FALSE(p.is_ipc(1, 0));
  EXPECT_FALSE(p.any_ipc);
}

TEST(PeerPaths, ASingleRankCopiesToItselfByIpcUnlessItRefuses) {
  const PeerPaths wants = decide_peer_paths({rank_on("a", "0000:10:00.0")}, everyone_reaches(1));
  EXPECT_TRUE(wants.any_ipc);
  EXPECT_FALSE(wants.any_engine);
  EXPECT_EQ(wants.ipc_peers_of(0), (std::vector<int32_t>{0}));
  const PeerPaths refuses = decide_peer_paths({rank_on("a", "0000:10:00.0", false)}, everyone_reaches(1));
  EXPECT_FALSE(refuses.any_ipc);
  EXPECT_TRUE(refuses.any_engine);
}

TEST(PeerPaths, AGpuWithoutABusIdTakesNoPartInIpc) {
  const NodeIdentity id = rank_on("a", "");
  EXPECT_EQ(id.wants_ipc, 0);
  std::vector<NodeIdentity> nodes = {id, rank_on("a", "0000:11:00.0")};
  EXPECT_FALSE(decide_peer_paths(nodes, everyone_reaches(2)).any_ipc);
}

TEST(PeerPaths, NodeIdentityIsTheHostAndBootIdUnlessNamed) {
  unsetenv("FERRY_NODE_ID");
  const NodeIdentity a = make_node_identity(true, "0000:10:00.0");
  const NodeIdentity b = make_node_identity(true, "0000:11:00.0");
  EXPECT_TRUE(same_node(a, b)) << "two processes of this machine";
  EXPECT_FALSE(same_node(a, rank_on("elsewhere", "0000:10:00.0")));
  EXPECT_TRUE(same_node(rank_on("n1", "x"), rank_on("n1", "y")));
}

TEST(PeerPaths, AnOverlongNodeIdIsRejectedNamingIt) {
  const std::string id(200, 'n');
  ScopedEnv env("FERRY_NODE_ID", id.c_str());
  try {
    make_node_identity(true, "0000:10:00.0");
    FAIL() << "accepted a 200-character node id";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("FERRY_NODE_ID"), std::string::npos) << e.what();
  }
}

TEST(PeerPaths, AReachMatrixOfTheWrongSizeIsAnInternalError) {
  std::vector<NodeIdentity> nodes = {rank_on("a", "0000:10:00.0"), rank_on("a", "0000:11:00.0")};
  EXPECT_THROW(decide_peer_paths(nodes, std::vector<uint8_t>(3, 1)), Error);
}

}  // namespace
}  // namespace ferry::cuda

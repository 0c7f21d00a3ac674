// Topology: which NICs and cores a GPU's rank should use, read from synthetic hwloc XML shaped like
// real nodes (tests/common/data/make_topologies.py), and discovery on this machine.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "transfer_engine/error.h"
#include "transfer_engine/topology.h"

namespace ferry::te {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string read_data(const std::string& name) {
  std::ifstream in(std::string(FERRY_TEST_DATA_DIR) + "/" + name);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Two sockets. Socket 0: a PCIe switch with gpu0 (12:00.0) and EFA nic0 (13:00.0), nic1 (14:00.0);
// a second root complex with the ENA nic2 (21:00.0) and a BMC display. Socket 1: a switch with
// gpu1 (92:00.0) and EFA nic3 (93:00.0), nic4 (94:00.0).
class P5Like : public ::testing::Test {
 protected:
  Topology topo = Topology::from_xml(read_data("p5_like_2socket.xml"));
};

TEST_F(P5Like, FindsTheNvidiaGpusButNotTheBmcDisplay) {
  ASSERT_EQ(topo.gpus().size(), 2u);
  EXPECT_EQ(topo.gpus()[0].pci_bus_id, "0000:12:00.0");
  EXPECT_EQ(topo.gpus()[1].pci_bus_id, "0000:92:00.0");
  EXPECT_EQ(topo.gpus()[0].numa_node, 0);
  EXPECT_EQ(topo.gpus()[1].numa_node, 1);
  EXPECT_EQ(topo.gpus()[0].device_id, 0x2330);
  EXPECT_THAT(topo.gpus()[0].name, HasSubstr("H100"));
  EXPECT_EQ(topo.host_name(), "p5-like");
}

TEST_F(P5Like, FindsEfaAndEnaNicsWithTheirDeviceNames) {
  ASSERT_EQ(topo.nics().size(), 5u);
  const auto& nics = topo.nics();
  EXPECT_EQ(nics[0].kind, NicKind::efa);
  EXPECT_THAT(nics[0].names, ElementsAre("rdmap19s0"));
  EXPECT_EQ(nics[2].kind, NicKind::ethernet);
  EXPECT_THAT(nics[2].names, ElementsAre("ens32"));
  EXPECT_EQ(nics[3].pci_bus_id, "0000:93:00.0");
  EXPECT_EQ(nics[3].numa_node, 1);
  EXPECT_EQ(nics[3].vendor_id, 0x1d0f);
}

TEST_F(P5Like, NicsAreRankedByPcieDistanceFromEachGpu) {
  // gpu0: its switch's two EFAs, then its socket's ENA, then the other socket's EFAs.
  EXPECT_THAT(topo.nics_near_gpu(0), ElementsAre(0, 1, 2, 3, 4));
  EXPECT_EQ(topo.distance(0, 0).path, PciPath::pix);
  EXPECT_EQ(topo.distance(0, 2).path, PciPath::node);
  EXPECT_EQ(topo.distance(0, 3).path, PciPath::sys);
  // gpu1: its own switch first; across the socket link the ENA is fewer hops than the EFAs behind
  // socket 0's switch.
  EXPECT_THAT(topo.nics_near_gpu(1), ElementsAre(3, 4, 2, 0, 1));
  EXPECT_LT(topo.distance(1, 2).hops, topo.distance(1, 0).hops);
  EXPECT_THAT(topo.nearest_nics(0), ElementsAre(0, 1));
  EXPECT_THAT(topo.nearest_nics(1), ElementsAre(3, 4));
}

TEST_F(P5Like, CoresNearADeviceAreItsSocketsIncludingHyperthreadSiblings) {
  EXPECT_THAT(topo.cores_near(DeviceKind::gpu, 0), ElementsAre(0, 1, 2, 3, 8, 9, 10, 11));
  EXPECT_THAT(topo.cores_near(DeviceKind::nic, 3), ElementsAre(4, 5, 6, 7, 12, 13, 14, 15));
  EXPECT_EQ(format_cpu_list(topo.cores_near(DeviceKind::gpu, 1)), "4-7,12-15");
  ASSERT_EQ(topo.numa_nodes().size(), 2u);
  EXPECT_EQ(topo.numa_nodes()[1].memory_bytes, uint64_t{256} << 30);
  EXPECT_THROW(topo.cores_near(DeviceKind::gpu, 2), Error);
}

TEST_F(P5Like, LibfabricDomainsAndCudaBusIdsMapToDevices) {
  EXPECT_EQ(topo.find_nic("rdmap147s0-rdm"), 3);
  EXPECT_EQ(topo.find_nic("rdmap147s0"), 3);
  EXPECT_EQ(topo.find_nic("0000:14:00.0"), 1);
  EXPECT_EQ(topo.find_nic("rdmap14"), -1);
  EXPECT_EQ(topo.find_gpu("00000000:92:00.0"), 1);  // as cudaDeviceGetPCIBusId prints it
  EXPECT_EQ(topo.find_gpu("0000:13:00.0"), -1);
  EXPECT_THAT(
      topo.order_near_gpu(1, {"rdmap19s0-rdm", "veth0", "rdmap148s0-rdm", "rdmap147s0-rdm"}),
      ElementsAre("rdmap147s0-rdm", "rdmap148s0-rdm", "rdmap19s0-rdm", "veth0"));
}

TEST_F(P5Like, ReportShowsPathsAndPlacement) {
  std::string report = topo.report();
  EXPECT_THAT(report, HasSubstr("2 NUMA node(s), 16 CPU(s), 2 GPU(s), 5 NIC(s)"));
  EXPECT_THAT(report, HasSubstr("gpu0 -> nics 0,1 (PIX), worker cores 0-3,8-11 (numa 0)"));
  EXPECT_THAT(report, HasSubstr("gpu1 -> nics 3,4 (PIX), worker cores 4-7,12-15 (numa 1)"));
  EXPECT_THAT(report, HasSubstr("rdmap147s0"));
  std::cout << report;
}

// One socket: gpu0 (03:00.0, VGA class) behind a switch whose other branch leads, two switch levels
// down, to an InfiniBand ConnectX nic0 (06:00.0); gpu1 (10:00.0) and a RoCE ConnectX nic1 (20:00.0)
// on their own root ports; a BMC display on the root complex.
class Cx7 : public ::testing::Test {
 protected:
  Topology topo = Topology::from_xml(read_data("cx7_1socket.xml"));
};

TEST_F(Cx7, VgaClassNvidiaGpusCountAndOtherDisplaysDoNot) {
  ASSERT_EQ(topo.gpus().size(), 2u);
  EXPECT_EQ(topo.gpus()[0].pci_bus_id, "0000:03:00.0");
  EXPECT_EQ(topo.gpus()[1].pci_bus_id, "0000:10:00.0");
}

TEST_F(Cx7, ConnectXInInfinibandAndRoceModeAreRdmaNicsNamedByVerbsDeviceFirst) {
  ASSERT_EQ(topo.nics().size(), 2u);
  EXPECT_EQ(topo.nics()[0].kind, NicKind::rdma);
  EXPECT_THAT(topo.nics()[0].names, ElementsAre("mlx5_0", "ib0"));
  EXPECT_EQ(topo.nics()[1].kind, NicKind::rdma);
  EXPECT_THAT(topo.nics()[1].names, ElementsAre("mlx5_1", "eth2"));
}

TEST_F(Cx7, ASharedSwitchBeatsTheHostBridgeEvenWithMoreHops) {
  EXPECT_EQ(topo.distance(0, 0).path, PciPath::pxb);
  EXPECT_EQ(topo.distance(0, 1).path, PciPath::phb);
  EXPECT_GT(topo.distance(0, 0).hops, topo.distance(0, 1).hops);
  EXPECT_THAT(topo.nics_near_gpu(0), ElementsAre(0, 1));
  // gpu1 reaches both through the host bridge: fewer hops wins.
  EXPECT_THAT(topo.nics_near_gpu(1), ElementsAre(1, 0));
  EXPECT_THAT(topo.cores_near(DeviceKind::gpu, 1), ElementsAre(0, 1, 2, 3));
}

TEST(Topology, MalformedXmlIsAnInvalidArgument) {
  try {
    Topology::from_xml("<topology version=\"2.0\"><object type=");
    FAIL() << "malformed XML was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_THAT(e.what(), HasSubstr("hwloc XML"));
  }
}

TEST(Topology, DiscoversThisMachine) {
  Topology topo = Topology::discover();
  ASSERT_FALSE(topo.cpus().empty());
  EXPECT_FALSE(topo.numa_nodes().empty());
  // No GPU and no NIC are valid answers here; whatever is found must be consistent.
  for (const TopoNic& n : topo.nics()) {
    for (int c : n.cpus)
      EXPECT_NE(std::find(topo.cpus().begin(), topo.cpus().end(), c), topo.cpus().end());
    EXPECT_FALSE(topo.cores_near(DeviceKind::nic, n.index).empty());
  }
  for (const TopoGpu& g : topo.gpus()) {
    EXPECT_EQ(topo.nics_near_gpu(g.index).size(), topo.nics().size());
  }
  std::string report = topo.report();
  EXPECT_THAT(report, HasSubstr("Placement"));
  std::cout << report;
}

TEST(Topology, CpuListsAreCompact) {
  EXPECT_EQ(format_cpu_list({8, 0, 1, 2, 3, 9, 10, 11}), "0-3,8-11");
  EXPECT_EQ(format_cpu_list({5}), "5");
  EXPECT_EQ(format_cpu_list({}), "-");
}

TEST(BindThreadToCores, PinsTheCallingThreadOnly) {
  Topology topo = Topology::discover();
  const int target = topo.cpus().back();
  cpu_set_t before;
  pthread_getaffinity_np(pthread_self(), sizeof(before), &before);
  std::vector<int> bound;
  cpu_set_t seen;
  CPU_ZERO(&seen);
  std::thread worker([&] {
    bound = bind_thread_to_cores({target, 1 << 20});  // the impossible CPU is dropped
    pthread_getaffinity_np(pthread_self(), sizeof(seen), &seen);
  });
  worker.join();
  EXPECT_THAT(bound, ElementsAre(target));
  EXPECT_EQ(CPU_COUNT(&seen), 1);
  EXPECT_TRUE(CPU_ISSET(target, &seen));
  cpu_set_t after;
  pthread_getaffinity_np(pthread_self(), sizeof(after), &after);
  EXPECT_TRUE(CPU_EQUAL(&before, &after)) << "the spawning thread was pinned too";
}

TEST(BindThreadToCores, NoAllowedCpuIsAnError) {
  try {
    bind_thread_to_cores({1 << 20});
    FAIL() << "bound to a CPU that does not exist";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_THAT(e.what(), HasSubstr("allowed"));
  }
}

}  // namespace
}  // namespace ferry::te

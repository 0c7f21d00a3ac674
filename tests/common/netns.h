// Several "hosts" with several "NICs" each on one machine: network namespaces joined by one Linux
// bridge per NIC plane, for tests that need real multi-host, multi-NIC traffic without hardware.
//
//   NetnsCluster cluster(2, 2);         // host0, host1; each with fnic0 and fnic1
//   cluster.netns(1)                    // namespace to enter for host 1 (setns or `ip netns exec`)
//   cluster.address(1, 0)               // "198.18.0.2": host 1's address on plane 0
//   cluster.set_rate(1, 0, "100mbit");  // token-bucket limit on host 1's link to switch 0
//   cluster.set_down(1, 1);             // host 1 loses its second NIC
//
// Layout: plane n is a bridge "fsw<n>" inside a switch namespace; host h's interface "fnic<n>"
// (address 198.18.<n>.<h+1>/24) is one end of a veth pair whose other end is a bridge port in the
// switch namespace. A rate limit is a token bucket on both ends of that veth (both directions); a
// downed link is the switch-side port taken down, so the host sees NO-CARRIER as with a pulled
// cable. Names carry a per-process prefix, so concurrent test processes never collide. Everything
// created is removed by the destructor, also when construction fails half way.
#pragma once
#include <string>
#include <vector>

namespace ferry::testing {

struct NetnsAvailability {
  bool ok = false;
  std::string reason;  // why not, in words a person can act on
};

class NetnsCluster {
 public:
  static constexpr int kMaxHosts = 250;
  static constexpr int kMaxNics = 8;

  // Throws std::runtime_error with the failing command and its output.
  NetnsCluster(int hosts, int nics_per_host);
  ~NetnsCluster();
  NetnsCluster(const NetnsCluster&) = delete;
  NetnsCluster& operator=(const NetnsCluster&) = delete;

  int hosts() const { return hosts_; }
  int nics_per_host() const { return nics_; }
  const std::string& netns(int host) const;  // namespace name of host h
  const std::string& switch_netns() const { return switch_ns_; }
  std::string interface(int host, int nic) const;  // "fnic<n>" inside the host namespace
  std::string address(int host, int nic) const;    // "198.18.<nic>.<host+1>"
  int prefix_length() const { return 24; }

  // Limits host h's link on plane n to `rate` (tc syntax: "100mbit", "1gbit") in both directions.
  void set_rate(int host, int nic, const std::string& rate);
  void clear_rate(int host, int nic);
  // Takes host h's link on plane n down (or up again), as a pulled cable would.
  void set_down(int host, int nic);
  void set_up(int host, int nic);

  // Whether this process may create network namespaces (root or CAP_SYS_ADMIN, iproute2 present).
  static NetnsAvailability available();

 private:
  std::string switch_port(int host, int nic) const;  // veth end inside the switch namespace
  void check_index(int host, int nic) const;
  void teardown() noexcept;

  int hosts_ = 0;
  int nics_ = 0;
  std::string prefix_;
  std::string switch_ns_;
  std::vector<std::string> host_ns_;
  std::vector<std::string> created_ns_;  // deleted in reverse order; veths go with their namespace
};

// Runs argv (no shell) and returns its exit status; stdout and stderr go to `output`.
int run_command(const std::vector<std::string>& argv, std::string* output);

}  // namespace ferry::testing

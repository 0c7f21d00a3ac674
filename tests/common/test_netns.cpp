// Several hosts with several NICs on one machine: the bootstrap across namespaces, a rate limit
// that really limits, and a downed link that really cuts.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "tests/common/multiprocess.h"
#include "tests/common/netns.h"

namespace ferry::testing {
namespace {

using Clock = std::chrono::steady_clock;

#define SKIP_WITHOUT_NETNS()                                       \
  do {                                                             \
    NetnsAvailability a = NetnsCluster::available();               \
    if (!a.ok) GTEST_SKIP() << "network namespaces: " << a.reason; \
  } while (0)

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Connects to ip:port within timeout_ms. Returns the socket, or -errno.
int connect_within(const std::string& ip, int port, int timeout_ms) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -errno;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, ip.c_str(), &addr.sin_addr);
  int rc = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = rc == 0 ? 0 : errno;
  if (err == EINPROGRESS) {
    pollfd p{fd, POLLOUT, 0};
    if (::poll(&p, 1, timeout_ms) == 1) {
      socklen_t len = sizeof(err);
      ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    } else {
      err = ETIMEDOUT;
    }
  }
  if (err != 0) {
    ::close(fd);
    return -err;
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  return fd;
}

// A listening socket on every address of this namespace; returns {fd, port}.
std::pair<int, int> listen_any() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  socklen_t len = sizeof(addr);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd, 16) != 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error(std::string("listen: ") + std::strerror(errno));
  }
  return {fd, ntohs(addr.sin_port)};
}

// Accepts within timeout_ms; returns the connection or -1.
int accept_within(int listener, int timeout_ms) {
  pollfd p{listener, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return -1;
  return ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
}

void set_io_timeout(int fd, int timeout_ms) {
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

// Rank 1 streams `bytes` to rank 0 at server_ip; rank 0 acknowledges the last byte. Returns the
// milliseconds rank 1 measured (on every rank), or a negative value when the transfer failed.
double timed_transfer(te::Bootstrap& b, const std::string& server_ip, size_t bytes,
                      int timeout_ms) {
  constexpr size_t kChunk = 64 << 10;
  std::vector<char> buf(kChunk, 'x');
  int port = 0, listener = -1;
  if (b.rank() == 0) std::tie(listener, port) = listen_any();
  int ports[2] = {};
  b.allgather(&port, sizeof(port), ports, 10000);
  double elapsed_ms = -1;
  if (b.rank() == 0) {
    int conn = accept_within(listener, timeout_ms);
    if (conn >= 0) {
      set_io_timeout(conn, timeout_ms);
      size_t got = 0;
      ssize_t n;
      while (got < bytes && (n = ::recv(conn, buf.data(), kChunk, 0)) > 0) got += n;
      char ack = got == bytes ? 'k' : 'e';
      (void)!::send(conn, &ack, 1, MSG_NOSIGNAL);
      ::close(conn);
    }
    ::close(listener);
  } else {
    auto start = Clock::now();
    int fd = connect_within(server_ip, ports[0], timeout_ms);
    if (fd >= 0) {
      set_io_timeout(fd, timeout_ms);
      size_t sent = 0;
      ssize_t n = 1;
      while (sent < bytes && n > 0) {
        n = ::send(fd, buf.data(), std::min(kChunk, bytes - sent), MSG_NOSIGNAL);
        if (n > 0) sent += n;
      }
      char ack = 0;
      if (sent == bytes && ::recv(fd, &ack, 1, 0) == 1 && ack == 'k') elapsed_ms = ms_since(start);
      ::close(fd);
    }
  }
  double all[2];
  b.allgather(&elapsed_ms, sizeof(elapsed_ms), all, timeout_ms + 10000);
  return all[1];
}

TEST(NetnsCluster, NamesAddressesAndCleanup) {
  SKIP_WITHOUT_NETNS();
  std::string first_ns;
  {
    NetnsCluster a(3, 2);
    NetnsCluster b(1, 1);  // a second cluster in the same process does not collide
    EXPECT_NE(a.netns(0), b.netns(0));
    EXPECT_NE(a.netns(0), a.netns(1));
    EXPECT_EQ(a.interface(2, 1), "fnic1");
    EXPECT_EQ(a.address(2, 1), "198.18.1.3");
    EXPECT_THROW(a.address(3, 0), std::out_of_range);
    std::string out;
    ASSERT_EQ(
        run_command({"ip", "-n", a.netns(2), "-o", "-4", "addr", "show", "dev", "fnic1"}, &out), 0);
    EXPECT_THAT(out, ::testing::HasSubstr("198.18.1.3/24"));
    ASSERT_EQ(run_command({"ip", "-n", a.netns(1), "link", "show", "lo"}, &out), 0);
    EXPECT_THAT(out, ::testing::HasSubstr("UP"));
    first_ns = a.netns(0);
  }
  std::string list;
  ASSERT_EQ(run_command({"ip", "netns", "list"}, &list), 0);
  EXPECT_THAT(list, ::testing::Not(::testing::HasSubstr(first_ns))) << "namespaces left behind";
}

TEST(NetnsCluster, BootstrapWorksAcrossHosts) {
  SKIP_WITHOUT_NETNS();
  NetnsCluster cluster(2, 2);
  LaunchOptions options;
  options.world_size = 2;
  options.timeout_ms = 30000;
  options.env = {{"MASTER_ADDR", cluster.address(0, 0)}};
  options.rank_netns = [&](int rank) { return cluster.netns(rank); };
  expect_all_ok(run_ranks(options, [&](te::Bootstrap& b) {
    // One rank per host.
    EXPECT_EQ(b.local_rank(), 0);
    EXPECT_EQ(b.local_size(), 1);
    // Each rank is inside its own host: its addresses exist here, the other host's do not.
    for (int host = 0; host < 2; ++host) {
      int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      ::inet_pton(AF_INET, cluster.address(host, 1).c_str(), &addr.sin_addr);
      int rc = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
      EXPECT_EQ(rc == 0, host == b.rank()) << "binding " << cluster.address(host, 1);
      ::close(fd);
    }
    uint32_t mine = 0xAB000000u | b.rank(), all[2];
    b.allgather(&mine, sizeof(mine), all, 10000);
    EXPECT_EQ(all[0], 0xAB000000u);
    EXPECT_EQ(all[1], 0xAB000001u);
    // The second plane carries traffic too.
    EXPECT_GT(timed_transfer(b, cluster.address(0, 1), 1 << 20, 10000), 0);
  }));
}

TEST(NetnsCluster, HostNamesPerNamespaceGiveLocalRanksPerHost) {
  SKIP_WITHOUT_NETNS();
  NetnsCluster cluster(2, 1);
  LaunchOptions options;
  options.world_size = 4;
  options.timeout_ms = 30000;
  // Two ranks per host; the launcher says nothing about locality, so it comes from host names.
  options.env = {
      {"MASTER_ADDR", cluster.address(0, 0)}, {"LOCAL_RANK", ""}, {"LOCAL_WORLD_SIZE", ""}};
  options.rank_netns = [&](int rank) { return cluster.netns(rank / 2); };
  options.netns_hostname = true;
  expect_all_ok(run_ranks(options, [&](te::Bootstrap& b) {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    EXPECT_EQ(std::string(host), cluster.netns(b.rank() / 2));
    EXPECT_EQ(b.local_size(), 2);
    EXPECT_EQ(b.local_rank(), b.rank() % 2);
  }));
}

TEST(NetnsCluster, RateLimitedLinkMeasurablySlowsTcp) {
  SKIP_WITHOUT_NETNS();
  NetnsCluster cluster(2, 1);
  LaunchOptions options;
  options.world_size = 2;
  options.timeout_ms = 40000;
  options.env = {{"MASTER_ADDR", cluster.address(0, 0)}};
  options.rank_netns = [&](int rank) { return cluster.netns(rank); };
  constexpr size_t kBytes = 4 << 20;
  constexpr double kRateMbit = 50;
  // 4 MiB at 50 Mbit/s take 0.67 s; unlimited, a veth moves them in a few milliseconds.
  const double limited_floor_ms = kBytes * 8 / (kRateMbit * 1e6) * 1000 * 0.8;

  auto transfer = [&](const char* what, auto check) {
    auto results = run_ranks(options, [&](te::Bootstrap& b) {
      double ms = timed_transfer(b, cluster.address(0, 0), kBytes, 15000);
      ASSERT_GT(ms, 0) << "transfer failed";
      if (b.rank() == 1) {
        std::printf("%s: %zu bytes in %.1f ms = %.1f Mbit/s\n", what, kBytes, ms,
                    kBytes * 8 / ms / 1e3);
      }
      check(ms);
    });
    expect_all_ok(results);
    std::cout << results[1].output;
  };
  transfer("unlimited", [&](double ms) { EXPECT_LT(ms, limited_floor_ms / 3); });
  cluster.set_rate(1, 0, "50mbit");
  transfer("50mbit", [&](double ms) {
    EXPECT_GT(ms, limited_floor_ms);
    EXPECT_LT(ms, limited_floor_ms * 4) << "far slower than the configured rate";
  });
  cluster.clear_rate(1, 0);
  transfer("limit cleared", [&](double ms) { EXPECT_LT(ms, limited_floor_ms / 3); });
}

TEST(NetnsCluster, DownedLinkFailsToConnectWhileTheOtherPlaneWorks) {
  SKIP_WITHOUT_NETNS();
  NetnsCluster cluster(2, 2);
  cluster.set_down(1, 0);
  LaunchOptions options;
  options.world_size = 2;
  options.timeout_ms = 40000;
  // Plane 0 of host 1 is cut, so the bootstrap runs over plane 1.
  options.env = {{"MASTER_ADDR", cluster.address(0, 1)}};
  options.rank_netns = [&](int rank) { return cluster.netns(rank); };
  expect_all_ok(run_ranks(options, [&](te::Bootstrap& b) {
    auto [listener, port] = b.rank() == 0 ? listen_any() : std::pair{-1, 0};
    int ports[2];
    b.allgather(&port, sizeof(port), ports, 10000);
    if (b.rank() == 1) {
      auto start = Clock::now();
      int fd = connect_within(cluster.address(0, 0), ports[0], 2000);
      EXPECT_LT(fd, 0) << "connected over a downed link";
      if (fd >= 0) ::close(fd);
      EXPECT_LT(ms_since(start), 5000);
      fd = connect_within(cluster.address(0, 1), ports[0], 5000);
      EXPECT_GE(fd, 0) << "plane 1 failed: " << std::strerror(-fd);
      if (fd >= 0) ::close(fd);
    }
    b.barrier(20000);
    if (listener >= 0) ::close(listener);
  }));

  // The cable goes back in: plane 0 carries traffic again.
  cluster.set_up(1, 0);
  options.env = {{"MASTER_ADDR", cluster.address(0, 0)}};
  expect_all_ok(run_ranks(options, [&](te::Bootstrap& b) {
    EXPECT_GT(timed_transfer(b, cluster.address(0, 0), 1 << 20, 10000), 0);
  }));
}

}  // namespace
}  // namespace ferry::testing

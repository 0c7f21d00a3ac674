// The TCP bootstrap admits only its own job. A live job of real ranks runs while another process
// (the intruder, forked by the test) connects to rank 0's port and misbehaves, or takes the port
// first; the job completes (or fails naming the right cause), no rank is blamed for the intruder,
// and the intruder never receives a host name or any data.
#include <arpa/inet.h>
#include <netdb.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/common/multiprocess.h"
#include "transfer_engine/bootstrap.h"
#include "transfer_engine/bootstrap_wire.h"
#include "transfer_engine/error.h"

namespace ferry::testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;
namespace wire = te::wire;

std::string host_name() {
  char name[256] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

int64_t ms_since(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
}

// Connects to 127.0.0.1:port, retrying while nothing listens yet; -1 after `within_ms`.
int connect_when_listening(int port, int within_ms) {
  const auto start = Clock::now();
  while (ms_since(start) < within_ms) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) return fd;
    ::close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

bool send_bytes(int fd, const void* data, size_t bytes) {
  return ::send(fd, data, bytes, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes);
}

// Everything `fd` receives until the peer closes it or `within_ms` passes; `closed` says which.
std::string read_until_closed(int fd, int within_ms, bool& closed) {
  std::string got;
  const auto start = Clock::now();
  closed = false;
  while (ms_since(start) < within_ms) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 50) <= 0) continue;
    char buf[4096];
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) {
      closed = true;
      break;
    }
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

// What one intruder connection did and got back, as one line a pipe can carry.
struct Seen {
  std::string label;
  size_t received = 0;
  bool closed_by_root = false;
  bool host_name_seen = false;
};

std::string encode(const std::vector<Seen>& seen) {
  std::ostringstream os;
  for (const Seen& s : seen) {
    os << s.label << ' ' << s.received << ' ' << s.closed_by_root << ' ' << s.host_name_seen << '\n';
  }
  return os.str();
}

std::vector<Seen> decode(const std::string& text) {
  std::vector<Seen> out;
  std::istringstream is(text);
  Seen s;
  while (is >> s.label >> s.received >> s.closed_by_root >> s.host_name_seen) out.push_back(s);
  return out;
}

// Runs `intruder` in a forked process while `job` runs here; returns what the intruder reported.
std::vector<Seen> with_intruder(const std::function<std::vector<Seen>()>& intruder,
                                const std::function<void()>& job) {
  int report[2];
  EXPECT_EQ(::pipe(report), 0);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(report[0]);
    const std::string text = encode(intruder());
    (void)!::write(report[1], text.data(), text.size());
    _exit(0);
  }
  ::close(report[1]);
  job();
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(report[0], buf, sizeof(buf))) > 0;) text.append(buf, static_cast<size_t>(n));
  ::close(report[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return decode(text);
}

wire::Nonce nonce_of(uint8_t fill) {
  wire::Nonce n;
  n.fill(fill);
  return n;
}

// One intruder connection: `act` sends what it likes (it may read the challenge); afterwards the
// connection stays open until rank 0 closes it, recording everything that arrives.
struct Attack {
  std::string label;
  std::function<void(int fd, std::string& received)> act;
};

std::vector<Seen> attack(int port, const std::vector<Attack>& attacks, int hold_ms) {
  const std::string host = host_name();
  std::vector<int> fds;
  std::vector<std::string> received(attacks.size());
  for (size_t i = 0; i < attacks.size(); ++i) {
    const int fd = connect_when_listening(port, 10000);
    fds.push_back(fd);
    if (fd >= 0) attacks[i].act(fd, received[i]);
  }
  std::vector<Seen> seen(attacks.size());
  for (size_t i = 0; i < attacks.size(); ++i) {
    seen[i].label = attacks[i].label;
    if (fds[i] < 0) {
      seen[i].label += "-never-connected";
      continue;
    }
    bool closed = false;
    received[i] += read_until_closed(fds[i], hold_ms, closed);
    seen[i].received = received[i].size();
    seen[i].closed_by_root = closed;
    seen[i].host_name_seen = received[i].find(host) != std::string::npos;
    ::close(fds[i]);
  }
  return seen;
}

// Greets properly and reads the challenge (what anyone may get), then says `hello`.
Attack hello_with_wrong_key(const std::string& label, int32_t rank, int32_t world) {
  return {label, [rank, world](int fd, std::string& received) {
            const wire::Nonce mine = nonce_of(7);
            const auto greeting = wire::make_greeting(mine);
            send_bytes(fd, greeting.data(), greeting.size());
            char challenge[wire::kChallengeBytes];
            size_t have = 0;
            while (have < sizeof(challenge)) {
              const ssize_t n = ::recv(fd, challenge + have, sizeof(challenge) - have, 0);
              if (n <= 0) return;
              have += static_cast<size_t>(n);
            }
            received.append(challenge, have);
            wire::Nonce root_nonce;
            std::memcpy(root_nonce.data(), challenge + 8, wire::kNonceBytes);
            const auto hello = wire::make_hello(wire::make_job_key("explicit\nguessed"), root_nonce,
                                                mine, rank, world);
            send_bytes(fd, hello.data(), hello.size());
          }};
}

Attack idle(const std::string& label) {
  return {label, [](int, std::string&) {}};
}

Attack sends(const std::string& label, std::vector<uint8_t> bytes) {
  return {label, [bytes](int fd, std::string&) { send_bytes(fd, bytes.data(), bytes.size()); }};
}

std::vector<uint8_t> header_bytes(wire::MsgType type, uint64_t seq, uint64_t bytes) {
  const wire::MsgHeader h = wire::make_header(type, seq, bytes);
  std::vector<uint8_t> out(sizeof(h));
  std::memcpy(out.data(), &h, sizeof(h));
  return out;
}

// The job the intruders try to disturb: 3 ranks; rank 2 arrives late, so rank 0 listens a while.
LaunchOptions late_rank_job(int port, int late_ms) {
  LaunchOptions options;
  options.world_size = 3;
  options.env = {{"MASTER_PORT", std::to_string(port)}};
  options.bootstrap_timeout_ms = 20000;
  options.before_bootstrap = [late_ms](int rank) {
    if (rank == 2) std::this_thread::sleep_for(std::chrono::milliseconds(late_ms));
  };
  return options;
}

// A job of late_rank_job while `attacks` run against its rank 0.
struct AttackedJob {
  std::vector<RankResult> results;
  int64_t job_ms = 0;
  std::vector<Seen> seen;  // what each attack got back
};

AttackedJob run_attacked_job(const std::vector<Attack>& attacks, int late_ms) {
  const int port = pick_free_port();
  AttackedJob out;
  out.seen = with_intruder([&] { return attack(port, attacks, 15000); },
                           [&] {
                             const auto start = Clock::now();
                             out.results = run_ranks(late_rank_job(port, late_ms),
                                                     [](te::Bootstrap& b) { b.barrier(10000); });
                             out.job_ms = ms_since(start);
                           });
  return out;
}

void expect_learnt_nothing(const std::vector<Seen>& seen, size_t expected_connections) {
  ASSERT_EQ(seen.size(), expected_connections);
  for (const Seen& s : seen) {
    EXPECT_THAT(s.label, ::testing::Not(HasSubstr("never-connected")))
        << "the attack must happen while rank 0 listens";
    EXPECT_LE(s.received, wire::kChallengeBytes) << s.label << " got more than the challenge";
    EXPECT_FALSE(s.host_name_seen) << s.label << " learnt a host name";
    EXPECT_TRUE(s.closed_by_root) << s.label << " was left open";
  }
}

TEST(ForeignClients, GarbageWrongKeysFakeRanksAndOversizedLengthsCostTheJobNothing) {
  std::vector<uint8_t> garbage(64 << 10);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<uint8_t>(i * 131 + 7);
  auto half_greeting = wire::make_greeting(nonce_of(3));
  std::vector<Attack> attacks = {
      sends("garbage", garbage),
      sends("half-greeting", {half_greeting.begin(), half_greeting.begin() + 10}),
      sends("oversized-frame", header_bytes(wire::MsgType::data, 0, uint64_t{1} << 40)),
      sends("huge-setup-blob", [] {
        auto h = header_bytes(wire::MsgType::data, 1, 100000);
        h.resize(h.size() + 4096, 0xff);
        return h;
      }()),
      hello_with_wrong_key("wrong-key-missing-rank", 2, 3),
      hello_with_wrong_key("wrong-key-taken-rank", 1, 3),
      hello_with_wrong_key("wrong-key-root-rank", 0, 3),
      hello_with_wrong_key("wrong-key-fake-rank", 99, 3),
      hello_with_wrong_key("wrong-key-other-world", 1, 1 << 30),
  };
  for (int i = 0; i < 8; ++i) attacks.push_back(idle("idle" + std::to_string(i)));
  const AttackedJob job = run_attacked_job(attacks, 2500);
  expect_all_ok(job.results);
  // Unauthenticated connections are served side by side: none of them holds up the late rank.
  EXPECT_LT(job.job_ms, 2500 + 4000);
  expect_learnt_nothing(job.seen, attacks.size());
  for (const Seen& s : job.seen) {
    if (s.label.rfind("wrong-key", 0) == 0) {
      EXPECT_EQ(s.received, wire::kChallengeBytes) << s.label << " got no challenge";
    } else {
      EXPECT_EQ(s.received, 0u) << s.label << " is not a greeting and gets no answer";
    }
  }
}

TEST(ForeignClients, AHundredIdleConnectionsDelayNobody) {
  std::vector<Attack> attacks;
  for (int i = 0; i < 100; ++i) attacks.push_back(idle("idle" + std::to_string(i)));
  const AttackedJob job = run_attacked_job(attacks, 2000);
  expect_all_ok(job.results);
  EXPECT_LT(job.job_ms, 2000 + 4000);
  expect_learnt_nothing(job.seen, attacks.size());
}

// A process that holds the port before rank 0 binds it hears one greeting per attempt (a random
// nonce) and nothing else: members check rank 0's proof of the key before they send their rank,
// host name or data.
TEST(ForeignClients, ASquatterOnThePortLearnsNoHostNameAndTheRanksSayWhy) {
  const int port = pick_free_port();
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  std::vector<RankResult> results;
  const auto seen = with_intruder(
      [&] {
        int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons(static_cast<uint16_t>(port));
        int one = 1;
        ::setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        const bool bound = ::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
                           ::listen(listener, 64) == 0;
        (void)!::write(ready[1], bound ? "1" : "0", 1);
        std::vector<Seen> out;
        const std::string host = host_name();
        const auto start = Clock::now();
        while (bound && ms_since(start) < 6000) {
          pollfd p{listener, POLLIN, 0};
          if (::poll(&p, 1, 100) <= 0) continue;
          const int fd = ::accept(listener, nullptr, nullptr);
          if (fd < 0) continue;
          // Answer like a root would, without the key.
          std::string got(wire::kGreetingBytes, '\0');
          size_t have = 0;
          while (have < got.size()) {
            pollfd p{fd, POLLIN, 0};
            if (::poll(&p, 1, 1000) <= 0) break;
            const ssize_t n = ::recv(fd, got.data() + have, got.size() - have, 0);
            if (n <= 0) break;
            have += static_cast<size_t>(n);
          }
          got.resize(have);
          const auto forged = wire::make_challenge(wire::make_job_key("explicit\nguessed"),
                                                   nonce_of(1), nonce_of(2));
          send_bytes(fd, forged.data(), forged.size());
          bool closed = false;
          got += read_until_closed(fd, 1000, closed);
          Seen s;
          s.label = "connection" + std::to_string(out.size());
          s.received = got.size();
          s.closed_by_root = closed;
          s.host_name_seen = got.find(host) != std::string::npos;
          out.push_back(s);
          ::close(fd);
        }
        return out;
      },
      [&] {
        char ok = 0;
        ASSERT_EQ(::read(ready[0], &ok, 1), 1);
        ASSERT_EQ(ok, '1') << "the squatter could not bind its port";
        LaunchOptions options;
        options.world_size = 2;
        options.env = {{"MASTER_PORT", std::to_string(port)}};
        options.bootstrap_timeout_ms = 3000;
        results = run_ranks(options, [](te::Bootstrap&) {});
      });
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[0].exit_code, 1) << results[0].output;
  EXPECT_THAT(results[0].output, AllOf(HasSubstr("cannot listen as bootstrap root"),
                                       HasSubstr("in use")));
  EXPECT_EQ(results[1].exit_code, 1) << results[1].output;
  EXPECT_THAT(results[1].output, AllOf(HasSubstr("failed the job-key check"), HasSubstr("[timeout]")));
  ASSERT_FALSE(seen.empty()) << "rank 1 never reached the squatter";
  for (const Seen& s : seen) {
    EXPECT_EQ(s.received, wire::kGreetingBytes) << s.label << ": a member said more than hello";
    EXPECT_FALSE(s.host_name_seen) << s.label;
  }
}

// ---- who may listen, and with which key --------------------------------------------------------

// The LISTEN sockets on `port` in /proc/net/tcp and tcp6: "address:port" as the kernel prints it.
std::vector<std::string> listeners_on(int port) {
  std::vector<std::string> out;
  char want[8];
  std::snprintf(want, sizeof(want), ":%04X", port);
  for (const char* path : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::istringstream is(line);
      std::string slot, local, remote, state;
      is >> slot >> local >> remote >> state;
      if (state == "0A" && local.size() > 5 && local.substr(local.size() - 5) == want) {
        out.push_back(local);
      }
    }
  }
  return out;
}

TEST(BootstrapListener, ForMasterAddrLoopbackItListensOnLoopbackOnly) {
  const int port = pick_free_port();
  LaunchOptions options;
  options.world_size = 2;
  options.env = {{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", std::to_string(port)}};
  options.before_bootstrap = [port](int rank) {
    if (rank != 1) return;
    // Rank 0 is setting up: look at its listener before joining.
    std::vector<std::string> seen;
    for (int i = 0; i < 200 && seen.empty(); ++i) {
      seen = listeners_on(port);
      if (seen.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    char loopback[32];
    std::snprintf(loopback, sizeof(loopback), "0100007F:%04X", port);
    EXPECT_THAT(seen, ::testing::ElementsAre(loopback)) << "not on 0.0.0.0 nor on any other address";
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) { b.barrier(10000); }));
}

// What `host` resolves to here, as /proc/net/tcp or tcp6 print a listener on `port`
// ("0100007F:1F90"), and whether every address is a loopback one.
std::vector<std::string> proc_net_addresses(const std::string& host, int port, bool& loopback_only) {
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* list = nullptr;
  std::vector<std::string> out;
  loopback_only = true;
  if (::getaddrinfo(host.c_str(), nullptr, &hints, &list) != 0) return out;
  for (addrinfo* ai = list; ai; ai = ai->ai_next) {
    char text[64];
    if (ai->ai_family == AF_INET) {
      const in_addr a = reinterpret_cast<sockaddr_in*>(ai->ai_addr)->sin_addr;
      loopback_only = loopback_only && (ntohl(a.s_addr) >> 24) == 127;
      std::snprintf(text, sizeof(text), "%08X:%04X", a.s_addr, port);
    } else if (ai->ai_family == AF_INET6) {
      const in6_addr& a = reinterpret_cast<sockaddr_in6*>(ai->ai_addr)->sin6_addr;
      loopback_only = loopback_only && IN6_IS_ADDR_LOOPBACK(&a);
      uint32_t w[4];
      std::memcpy(w, &a, sizeof(w));
      std::snprintf(text, sizeof(text), "%08X%08X%08X%08X:%04X", w[0], w[1], w[2], w[3], port);
    } else {
      continue;
    }
    if (std::find(out.begin(), out.end(), text) == out.end()) out.push_back(text);
  }
  ::freeaddrinfo(list);
  std::sort(out.begin(), out.end());
  return out;
}

// MASTER_ADDR as srun's first-node rendezvous writes it: this host's name. Where that name
// resolves to loopback here (/etc/hosts), the other hosts still reach it by the network address,
// so rank 0 listens on every interface; elsewhere exactly on what the name resolves to.
TEST(BootstrapListener, ForThisHostsNameItListensWhereOtherHostsReachIt) {
  const int port = pick_free_port();
  const std::string host = host_name();
  bool loopback_only = false;
  std::vector<std::string> expected = proc_net_addresses(host, port, loopback_only);
  ASSERT_FALSE(expected.empty()) << host << " does not resolve";
  if (loopback_only) {
    char any[64];
    std::snprintf(any, sizeof(any), "00000000000000000000000000000000:%04X", port);
    expected = {any};
  }
  LaunchOptions options;
  options.world_size = 2;
  options.env = {{"MASTER_ADDR", host}, {"MASTER_PORT", std::to_string(port)}};
  options.before_bootstrap = [port, expected](int rank) {
    if (rank != 1) return;
    std::vector<std::string> seen;
    for (int i = 0; i < 200 && seen.empty(); ++i) {
      seen = listeners_on(port);
      if (seen.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, expected);
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) { b.barrier(10000); }));
}

TEST(BootstrapListener, AMasterAddrThatIsNotThisHostsIsRefusedWithTheOverrideNamed) {
  LaunchOptions options;
  options.world_size = 2;
  options.env = {{"MASTER_ADDR", "192.0.2.1"}};  // TEST-NET-1: never configured
  options.bootstrap_timeout_ms = 2000;
  const auto start = Clock::now();
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  EXPECT_EQ(results[0].exit_code, 1);
  EXPECT_THAT(results[0].output, AllOf(HasSubstr("not an address of this host"),
                                       HasSubstr("FERRY_BOOTSTRAP_BIND_ADDR"),
                                       HasSubstr("[invalid argument]")));
  EXPECT_EQ(results[1].exit_code, 1);
  EXPECT_LT(ms_since(start), 2000 + 5000);
}

TEST(BootstrapListener, TheBindOverrideServesAMasterAddrReachedThroughNat) {
  // Rank 0 knows its public name (not local); the members reach it through loopback.
  LaunchOptions options;
  options.world_size = 3;
  options.rank_env = [](int rank) {
    return rank == 0 ? std::map<std::string, std::string>{{"MASTER_ADDR", "192.0.2.1"},
                                                          {"FERRY_BOOTSTRAP_BIND_ADDR", "127.0.0.1"}}
                     : std::map<std::string, std::string>{{"MASTER_ADDR", "127.0.0.1"}};
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) { b.barrier(10000); }));
}

TEST(JobKey, ARankWithAnotherKeyCannotJoinAndEveryRankSaysSo) {
  LaunchOptions options;
  options.world_size = 3;
  options.bootstrap_timeout_ms = 3000;
  options.env = {{"FERRY_JOB_KEY", "alpha"}};
  options.rank_env = [](int rank) {
    return rank == 2 ? std::map<std::string, std::string>{{"FERRY_JOB_KEY", "beta"}}
                     : std::map<std::string, std::string>{};
  };
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  EXPECT_EQ(results[2].exit_code, 1);
  EXPECT_THAT(results[2].output, AllOf(HasSubstr("failed the job-key check"),
                                       HasSubstr("job key FERRY_JOB_KEY")));
  EXPECT_THAT(results[2].output, ::testing::Not(HasSubstr("beta"))) << "the key is never printed";
  for (int r : {0, 1}) {
    EXPECT_EQ(results[r].exit_code, 1);
    EXPECT_THAT(results[r].output, AllOf(HasSubstr("rank 2 did not connect"),
                                         HasSubstr("never proved the job key")));
  }
}

TEST(JobKey, RanksSharingAnExplicitKeyMeet) {
  LaunchOptions options;
  options.world_size = 3;
  options.env = {{"FERRY_JOB_KEY", "a long random secret the launcher handed out"}};
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    int mine = b.rank() * 10, all[3];
    b.allgather(&mine, sizeof(mine), all, 10000);
    EXPECT_THAT(all, ::testing::ElementsAre(0, 10, 20));
  }));
}

// Error text never grows with the world: the ranks still missing are named up to a few, then
// counted.
TEST(BoundedErrors, ASetupTimeoutAtAMillionRanksNamesAFewAndCountsTheRest) {
  te::TcpBootstrapConfig config;
  config.master_port = pick_free_port();
  config.world_size = 1 << 20;
  config.rank = 0;
  config.timeout_ms = 500;
  try {
    te::make_tcp_bootstrap(config);
    FAIL() << "a root alone completed setup";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_LT(what.size(), 512u) << what.substr(0, 512);
    EXPECT_THAT(what, HasSubstr("ranks 1, 2, 3, 4, 5, 6, 7, 8 and 1048567 others did not connect"));
  }
}

}  // namespace
}  // namespace ferry::testing

// TCP rendezvous through rank 0, the callback bootstrap, and the bootstrap the launcher's
// environment asks for.
//
// Rank 0 is a star hub. A connection is trusted only after the handshake of bootstrap_wire.h
// proves, in both directions, that the other side holds the job key; only then does a member send
// its host name or any data, and only then does rank 0 look at the rank it claims. Until then a
// connection has its own short deadline and a fixed handshake size, is read without blocking, and
// is closed when it fails: garbage, idle connections, a wrong key, or a process that took the port
// cost nothing, blame no rank and never end the job. Authenticated members can fail the job (two
// processes claiming one rank, differing world sizes), with an error on every rank.
//
// After setup, rank 0 relays allgathers: members send their contribution (data), rank 0 answers
// with the whole result, or with an abort naming who failed. A member whose deadline passes asks
// rank 0 who is missing (query), so every rank reports the same culprit even when their clocks
// started at slightly different times.
#include "transfer_engine/bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "transfer_engine/bootstrap_wire.h"
#include "transfer_engine/error.h"
#include "transfer_engine/launch_env.h"
#include "transfer_engine/random.h"
#include "transfer_engine/ranks.h"

namespace ferry::te {

void Bootstrap::barrier(int timeout_ms) {
  // A one-byte allgather: nobody leaves before everybody has arrived.
  uint8_t token = 1;
  std::vector<uint8_t> all(static_cast<size_t>(world_size()));
  allgather(&token, 1, all.data(), timeout_ms);
}

namespace {

using Clock = std::chrono::steady_clock;
using wire::MsgHeader;
using wire::MsgType;

constexpr size_t kHostNameBytes = 256;
// How long a rank whose own deadline passed waits for the root to say who is missing.
constexpr int kQueryGraceMs = 2000;
// How long the root spends telling the others that an operation failed.
constexpr int kAbortSendMs = 1000;
// A connection that has not finished its handshake after this long is closed. Members answer at
// once; only a client that is not one of ours waits this long, and it delays nobody meanwhile.
constexpr int kHandshakeMs = 5000;
// Connections still in their handshake that rank 0 keeps at once; beyond it the oldest is closed
// (a member whose connection is closed connects again).
constexpr size_t kMaxPendingConnections = 128;

class Deadline {
 public:
  explicit Deadline(int timeout_ms)
      : end_(Clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0))) {}
  int remaining_ms() const {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end_ - Clock::now()).count();
    return left > 0 ? static_cast<int>(std::min<int64_t>(left, 1 << 30)) : 0;
  }
  bool expired() const { return Clock::now() >= end_; }
  Clock::time_point end() const { return end_; }

 private:
  Clock::time_point end_;
};

class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

std::string errno_text(int err) {
  return std::string(std::strerror(err));
}

enum class Io { ok, timeout, closed };

struct IoResult {
  Io io = Io::ok;
  int err = 0;  // errno for Io::closed (0: orderly shutdown by the peer)
};

void set_socket_options(int fd) {
  int one = 1;
  // Bootstrap messages are small request/response pairs; Nagle would add 40 ms per round.
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  int flags = ::fcntl(fd, F_GETFL, 0);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

IoResult wait_fd(int fd, short events, const Deadline& deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, deadline.remaining_ms());
    if (rc < 0) {
      if (errno == EINTR) continue;
      return {Io::closed, errno};
    }
    if (rc == 0) return {Io::timeout, 0};
    return {Io::ok, 0};
  }
}

IoResult send_all(int fd, const void* buf, size_t bytes, const Deadline& deadline) {
  auto* p = static_cast<const uint8_t*>(buf);
  while (bytes > 0) {
    ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      IoResult w = wait_fd(fd, POLLOUT, deadline);
      if (w.io != Io::ok) return w;
      continue;
    }
    return {Io::closed, n < 0 ? errno : 0};
  }
  return {};
}

IoResult recv_all(int fd, void* buf, size_t bytes, const Deadline& deadline) {
  auto* p = static_cast<uint8_t*>(buf);
  while (bytes > 0) {
    ssize_t n = ::recv(fd, p, bytes, 0);
    if (n > 0) {
      p += n;
      bytes -= static_cast<size_t>(n);
      continue;
    }
    if (n == 0) return {Io::closed, 0};
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      IoResult w = wait_fd(fd, POLLIN, deadline);
      if (w.io != Io::ok) return w;
      continue;
    }
    return {Io::closed, errno};
  }
  return {};
}

IoResult send_msg(int fd, MsgType type, uint64_t seq, const void* payload, size_t bytes,
                  const Deadline& deadline) {
  const MsgHeader h = wire::make_header(type, seq, bytes);
  IoResult r = send_all(fd, &h, sizeof(h), deadline);
  if (r.io != Io::ok || bytes == 0) return r;
  return send_all(fd, payload, bytes, deadline);
}

IoResult recv_header(int fd, uint8_t (&raw)[sizeof(MsgHeader)], const Deadline& deadline) {
  return recv_all(fd, raw, sizeof(raw), deadline);
}

std::string closed_text(const IoResult& r) {
  return r.err == 0 ? "connection closed" : errno_text(r.err);
}

std::string local_host_name() {
  char name[kHostNameBytes] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown-host";
  return name;
}

// Ranks that share a host name share a host: local rank = how many lower ranks share it.
std::pair<int, int> derive_local(const std::vector<std::string>& hosts, int rank) {
  int local_rank = 0, local_size = 0;
  for (int r = 0; r < static_cast<int>(hosts.size()); ++r) {
    if (hosts[r] != hosts[rank]) continue;
    if (r < rank) ++local_rank;
    ++local_size;
  }
  return {local_rank, local_size};
}

// Exchanges host names through `bootstrap` and fills in whichever of local rank/size is unknown.
void resolve_locality(Bootstrap& bootstrap, int timeout_ms, int& local_rank, int& local_size) {
  const int world = bootstrap.world_size();
  std::vector<char> mine(kHostNameBytes, 0);
  std::string host = local_host_name();
  std::memcpy(mine.data(), host.data(), std::min(host.size(), kHostNameBytes - 1));
  std::vector<char> all(kHostNameBytes * static_cast<size_t>(world));
  bootstrap.allgather(mine.data(), kHostNameBytes, all.data(), timeout_ms);
  std::vector<std::string> hosts;
  for (int r = 0; r < world; ++r) {
    const char* p = all.data() + kHostNameBytes * static_cast<size_t>(r);
    hosts.emplace_back(p, strnlen(p, kHostNameBytes));
  }
  auto [derived_rank, derived_size] = derive_local(hosts, bootstrap.rank());
  if (local_rank < 0) local_rank = derived_rank;
  if (local_size < 0) local_size = derived_size;
}

void validate_locality(const char* who, int rank, int local_rank, int local_size) {
  if (local_size == 0 || local_size < -1 || local_rank < -1 ||
      (local_rank >= 0 && local_size > 0 && local_rank >= local_size)) {
    raise(Status::invalid_argument, std::string(who) + " rank " + std::to_string(rank) +
                                        ": local_rank " + std::to_string(local_rank) +
                                        " does not fit local_size " + std::to_string(local_size));
  }
}

std::string address_text(const sockaddr* a) {
  char host[INET6_ADDRSTRLEN] = {};
  if (a->sa_family == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(a)->sin_addr, host, sizeof(host));
  } else if (a->sa_family == AF_INET6) {
    ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(a)->sin6_addr, host, sizeof(host));
  }
  return host;
}

bool is_address_literal(const std::string& host) {
  in6_addr a6;
  in_addr a4;
  return ::inet_pton(AF_INET, host.c_str(), &a4) == 1 || ::inet_pton(AF_INET6, host.c_str(), &a6) == 1;
}

bool is_localhost_name(const std::string& host) {
  for (const char* name : {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}) {
    if (strcasecmp(host.c_str(), name) == 0) return true;
  }
  return false;
}

bool is_loopback(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in&>(a).sin_addr.s_addr) >> 24) == 127;
  }
  const in6_addr& a6 = reinterpret_cast<const sockaddr_in6&>(a).sin6_addr;
  return IN6_IS_ADDR_LOOPBACK(&a6) ||
         (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
}

// ------------------------------------------------------------------------------------------------
// TCP

class TcpBootstrap final : public Bootstrap {
 public:
  explicit TcpBootstrap(const TcpBootstrapConfig& config) : config_(config) {
    if (config.world_size < 1 || config.rank < 0 || config.rank >= config.world_size) {
      raise(Status::invalid_argument, "tcp bootstrap: rank " + std::to_string(config.rank) +
                                          " is outside world_size " +
                                          std::to_string(config.world_size));
    }
    if (config.master_port <= 0 || config.master_port > 65535) {
      raise(Status::invalid_argument, "tcp bootstrap rank " + std::to_string(config.rank) +
                                          ": master_port " + std::to_string(config.master_port) +
                                          " is not a TCP port");
    }
    validate_locality("tcp bootstrap", config.rank, config.local_rank, config.local_size);
    local_rank_ = config.local_rank;
    local_size_ = config.local_size;
    JobKeySource source;
    if (config.job_key.empty()) {
      source = job_key_source(config.master_port);
    } else {
      // The same material FERRY_JOB_KEY gives, so ranks configured either way agree.
      source.material = "explicit\n" + config.job_key;
      source.description = "TcpBootstrapConfig::job_key";
    }
    key_ = wire::make_job_key(source.material);
    key_description_ = source.description;
    Deadline deadline(config.timeout_ms);
    if (config.world_size > 1) {
      if (config.rank == 0) {
        peers_.resize(static_cast<size_t>(config.world_size));
        accept_all(deadline);
      } else {
        connect_root(deadline);
      }
    }
    // The first allgather doubles as "everybody is connected and ready".
    resolve_locality(*this, std::max(deadline.remaining_ms(), 1), local_rank_, local_size_);
  }

  int rank() const override { return config_.rank; }
  int world_size() const override { return config_.world_size; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }

  void allgather(const void* in, size_t bytes, void* out, int timeout_ms) override {
    if (!failure_.empty()) {
      raise(failure_status_, prefix() + "unusable after an earlier failure: " + failure_);
    }
    if (bytes > 0 && (in == nullptr || out == nullptr)) {
      raise(Status::invalid_argument,
            prefix() + "allgather of " + std::to_string(bytes) + " bytes with a null buffer");
    }
    if (bytes > 0 && bytes > SIZE_MAX / static_cast<size_t>(config_.world_size)) {
      raise(Status::invalid_argument, prefix() + "allgather of " + std::to_string(bytes) +
                                          " bytes per rank overflows the result size");
    }
    const uint64_t seq = seq_++;
    Deadline deadline(timeout_ms);
    // A zero-byte allgather still synchronises, but its buffers may be null: no pointer arithmetic.
    auto* result = static_cast<uint8_t*>(out);
    if (bytes > 0) std::memmove(result + bytes * static_cast<size_t>(config_.rank), in, bytes);
    if (config_.world_size == 1) return;
    if (config_.rank == 0) {
      root_allgather(seq, bytes, result, timeout_ms, deadline);
    } else {
      member_allgather(seq, in, bytes, result, timeout_ms, deadline);
    }
  }

 private:
  std::string prefix() const { return "bootstrap rank " + std::to_string(config_.rank) + ": "; }
  std::string where() const {
    return config_.master_addr + ":" + std::to_string(config_.master_port);
  }
  std::string root_name() const { return "rank 0 (bootstrap root at " + where() + ")"; }

  [[noreturn]] void fail(Status status, const std::string& text) {
    failure_status_ = status;
    failure_ = text;
    raise(status, prefix() + text);
  }

  // Root only: tell every connected rank why the operation failed, then throw it here too. A rank
  // that asked (query) is told as well: the abort is its answer.
  [[noreturn]] void fail_all(Status status, const std::string& text) {
    Deadline deadline(kAbortSendMs);
    std::string message = text + " (reported by rank 0)";
    for (int r = 1; r < static_cast<int>(peers_.size()); ++r) {
      if (!peers_[r].valid()) continue;
      send_msg(peers_[r].get(), MsgType::abort, static_cast<uint64_t>(status), message.data(),
               message.size(), deadline);
    }
    fail(status, text);
  }

  // -------- setup: rank 0 --------

  // The addresses to listen on: the override, else what master_addr resolves to. Listening on
  // exactly those keeps the port off every other interface (MASTER_ADDR=127.0.0.1 stays on
  // loopback). An address that is not this host's is refused rather than widened to every
  // interface: the override says so explicitly.
  std::vector<sockaddr_storage> bind_targets(bool& explicit_bind, std::string& what) const {
    std::string host = config_.bind_addr;
    if (host.empty()) {
      if (const char* v = std::getenv("FERRY_BOOTSTRAP_BIND_ADDR"); v != nullptr && *v != '\0') {
        host = v;
      }
    }
    explicit_bind = !host.empty();
    if (!explicit_bind) host = config_.master_addr;
    what = explicit_bind ? "FERRY_BOOTSTRAP_BIND_ADDR '" + host + "'" : "MASTER_ADDR '" + host + "'";
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = explicit_bind ? AI_PASSIVE | AI_NUMERICHOST : 0;
    addrinfo* list = nullptr;
    const std::string port = std::to_string(config_.master_port);
    int gai = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &list);
    if (gai != 0) {
      raise(Status::invalid_argument, prefix() + "cannot listen as bootstrap root: " + what +
                                          " does not resolve: " + gai_strerror(gai));
    }
    std::vector<sockaddr_storage> out;
    for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
      if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6) continue;
      sockaddr_storage a{};
      std::memcpy(&a, ai->ai_addr, ai->ai_addrlen);
      const bool seen = std::any_of(out.begin(), out.end(), [&](const sockaddr_storage& b) {
        return std::memcmp(&a, &b, sizeof(a)) == 0;
      });
      if (!seen) out.push_back(a);
    }
    ::freeaddrinfo(list);
    // This host's own name often resolves to loopback here (/etc/hosts: "127.0.1.1 node07") while
    // other hosts reach the same name at the host's network address, as srun's first-node
    // rendezvous does. Loopback alone would shut them out, so such a name listens on every
    // interface; the job key still decides who gets in. An address literal or "localhost" means
    // exactly what it says.
    if (!explicit_bind && !is_address_literal(host) && !is_localhost_name(host) && !out.empty() &&
        std::all_of(out.begin(), out.end(), is_loopback)) {
      what += " (this host's name, resolved to loopback here: every interface)";
      sockaddr_storage a{};
      if (Fd probe(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0)); probe.valid()) {
        auto& any6 = reinterpret_cast<sockaddr_in6&>(a);
        any6.sin6_family = AF_INET6;  // dual stack: IPv4 too
        any6.sin6_addr = in6addr_any;
        any6.sin6_port = htons(static_cast<uint16_t>(config_.master_port));
      } else {
        auto& any4 = reinterpret_cast<sockaddr_in&>(a);
        any4.sin_family = AF_INET;
        any4.sin_addr.s_addr = htonl(INADDR_ANY);
        any4.sin_port = htons(static_cast<uint16_t>(config_.master_port));
      }
      out.assign(1, a);
    }
    return out;
  }

  std::vector<Fd> listen_sockets(const Deadline& deadline) {
    bool explicit_bind = false;
    std::string what;
    const std::vector<sockaddr_storage> targets = bind_targets(explicit_bind, what);
    std::string last_error = "no address to listen on";
    int delay_ms = 10;
    for (;;) {
      std::vector<Fd> listeners;
      std::vector<std::string> foreign;
      bool in_use = false;
      for (const sockaddr_storage& target : targets) {
        const auto* a = reinterpret_cast<const sockaddr*>(&target);
        Fd fd(::socket(a->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!fd.valid()) {
          last_error = "socket: " + errno_text(errno);
          continue;  // e.g. no IPv6 on this host: the other addresses still serve
        }
        int one = 1;
        // A previous job's connections in TIME_WAIT must not keep the port; SO_REUSEADDR never
        // lets two listeners share it.
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        socklen_t len = sizeof(sockaddr_in);
        if (a->sa_family == AF_INET6) {
          // "::" asked for explicitly listens for IPv4 too; a specific IPv6 address only for itself.
          const auto* a6 = reinterpret_cast<const sockaddr_in6*>(a);
          int v6only = IN6_IS_ADDR_UNSPECIFIED(&a6->sin6_addr) ? 0 : 1;
          ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
          len = sizeof(sockaddr_in6);
        }
        if (::bind(fd.get(), a, len) == 0 && ::listen(fd.get(), 1024) == 0) {
          set_socket_options(fd.get());
          listeners.push_back(std::move(fd));
          continue;
        }
        const int err = errno;
        if (err == EADDRNOTAVAIL) {
          foreign.push_back(address_text(a));
          continue;
        }
        last_error = "listening on " + address_text(a) + " port " +
                     std::to_string(config_.master_port) + ": " + errno_text(err);
        if (err == EADDRINUSE) in_use = true;
      }
      if (!in_use && !listeners.empty()) return listeners;
      if (!in_use && !foreign.empty()) {
        std::string list;
        for (size_t i = 0; i < foreign.size(); ++i) list += (i ? ", " : "") + foreign[i];
        fail(Status::invalid_argument,
             "cannot listen as bootstrap root: " + what + " resolves to " + list +
                 ", not an address of this host. Rank 0 must run on the host MASTER_ADDR names; "
                 "when that address reaches this host through NAT, a proxy or a DNS alias, set "
                 "FERRY_BOOTSTRAP_BIND_ADDR to the local address to listen on (0.0.0.0 or :: for "
                 "every interface)");
      }
      // The port may still be held by a previous job that is shutting down: retry until the
      // deadline. A process that holds it on purpose learns nothing from our members, who check
      // the key before they say anything.
      if (!in_use || deadline.expired()) {
        fail(Status::transport, "cannot listen as bootstrap root: " + last_error);
      }
      std::this_thread::sleep_for(
          std::chrono::milliseconds(std::min(delay_ms, deadline.remaining_ms())));
      delay_ms = std::min(delay_ms * 2, 200);
    }
  }

  // A connection that has not proved the job key yet.
  struct Pending {
    Fd fd;
    Clock::time_point deadline;
    bool challenged = false;  // greeting read and challenge sent; the hello is next
    uint8_t buffer[wire::kMaxHandshakeBytes] = {};
    size_t have = 0;
    wire::Nonce member_nonce{};
    wire::Nonce root_nonce{};
    size_t want() const { return challenged ? wire::kHelloBytes : wire::kGreetingBytes; }
  };

  enum class Step { wait, drop, joined };

  // Advances one pending connection by what its socket holds now; never blocks.
  Step advance(Pending& p, int& joined_rank) {
    for (;;) {
      const ssize_t n = ::recv(p.fd.get(), p.buffer + p.have, p.want() - p.have, MSG_DONTWAIT);
      if (n == 0) return Step::drop;
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? Step::wait : Step::drop;
      }
      p.have += static_cast<size_t>(n);
      if (p.have < p.want()) continue;
      const std::span<const uint8_t> message(p.buffer, p.have);
      p.have = 0;
      if (!p.challenged) {
        if (!wire::parse_greeting(message, p.member_nonce)) return Step::drop;
        random_bytes(p.root_nonce.data(), p.root_nonce.size());
        const auto challenge = wire::make_challenge(key_, p.member_nonce, p.root_nonce);
        // A fresh socket's send buffer always takes the challenge whole; one that does not is not a
        // member waiting for it.
        if (::send(p.fd.get(), challenge.data(), challenge.size(), MSG_NOSIGNAL | MSG_DONTWAIT) !=
            static_cast<ssize_t>(challenge.size())) {
          return Step::drop;
        }
        p.challenged = true;
        continue;
      }
      const wire::HelloCheck hello = wire::check_hello(message, key_, p.root_nonce, p.member_nonce);
      if (!hello.authentic) return Step::drop;
      admit(p.fd.get(), hello);
      joined_rank = hello.rank;
      return Step::joined;
    }
  }

  // An authenticated hello: its sender holds the key, so what it claims is a launch error that
  // fails the job on every rank.
  void admit(int fd, const wire::HelloCheck& hello) {
    std::string problem;
    if (hello.world_size != config_.world_size) {
      problem = "rank " + std::to_string(hello.rank) + " was started with world_size " +
                std::to_string(hello.world_size) + ", rank 0 with " +
                std::to_string(config_.world_size);
    } else if (hello.rank == 0 || (hello.rank > 0 && hello.rank < config_.world_size &&
                                   peers_[static_cast<size_t>(hello.rank)].valid())) {
      problem = "two processes claim rank " + std::to_string(hello.rank);
    } else if (hello.rank < 0 || hello.rank >= config_.world_size) {
      problem = "a process claims rank " + std::to_string(hello.rank) + " outside world_size " +
                std::to_string(config_.world_size);
    }
    if (problem.empty()) return;
    // The newcomer is not among peers_: tell it first, or it would only see rank 0 leave.
    std::string message = problem + " (reported by rank 0)";
    Deadline abort_deadline(kAbortSendMs);
    send_msg(fd, MsgType::abort, static_cast<uint64_t>(Status::invalid_argument), message.data(),
             message.size(), abort_deadline);
    fail_all(Status::invalid_argument, problem);
  }

  std::vector<int> missing_peers() const {
    std::vector<int> missing;
    for (int r = 1; r < config_.world_size; ++r) {
      if (!peers_[r].valid()) missing.push_back(r);
    }
    return missing;
  }

  // A ready rank's first contribution is queued and unread, so poll would report it readable
  // forever; instead look behind it (without consuming anything) for a query, which means that rank
  // gave up on setup: its clock started earlier than ours.
  void check_ready_for_queries(const std::vector<bool>& ready, const std::vector<int>& missing) {
    uint8_t buf[2 * sizeof(MsgHeader) + kHostNameBytes];
    for (int r = 1; r < config_.world_size; ++r) {
      if (!ready[r]) continue;
      const ssize_t n = ::recv(peers_[r].get(), buf, sizeof(buf), MSG_PEEK | MSG_DONTWAIT);
      if (n <= 0) continue;
      if (wire::query_behind_first_contribution({buf, static_cast<size_t>(n)}, kHostNameBytes)) {
        fail_all(Status::timeout, "bootstrap setup timed out: " + describe_ranks(missing) +
                                      " did not connect to rank 0 (rank " + std::to_string(r) +
                                      " gave up waiting)" + dropped_note());
      }
    }
  }

  // What the root saw of connections that never became members: a member that "did not connect"
  // because it runs with another key leaves right after rank 0's challenge.
  std::string dropped_note() const {
    if (unproven_connections_ == 0) return "";
    return "; rank 0 challenged " + std::to_string(unproven_connections_) +
           " connection(s) that never proved the job key (job key " + key_description_ +
           "; a rank running with another FERRY_JOB_KEY or launcher job id?)";
  }

  void drop(const Pending& p) {
    if (p.challenged) ++unproven_connections_;
  }

  void accept_all(const Deadline& deadline) {
    std::vector<Fd> listeners = listen_sockets(deadline);
    std::vector<Pending> pending;
    std::vector<bool> ready(static_cast<size_t>(config_.world_size), false);
    for (;;) {
      std::vector<int> missing = missing_peers();
      if (missing.empty()) return;  // listeners and pending connections close here
      if (deadline.expired()) {
        fail_all(Status::timeout, "bootstrap setup timed out after " +
                                      std::to_string(config_.timeout_ms) + " ms: " +
                                      describe_ranks(missing) + " did not connect to rank 0 at " +
                                      where() + dropped_note());
      }
      const auto now = Clock::now();
      pending.erase(std::remove_if(pending.begin(), pending.end(),
                                   [&](const Pending& p) {
                                     if (p.deadline > now) return false;
                                     drop(p);
                                     return true;
                                   }),
                    pending.end());
      // Listeners, then connections in their handshake, then members: one that leaves or gives up
      // must fail setup now, not at the deadline.
      std::vector<pollfd> fds;
      for (const Fd& l : listeners) fds.push_back({l.get(), POLLIN, 0});
      for (const Pending& p : pending) fds.push_back({p.fd.get(), POLLIN, 0});
      std::vector<int> who;
      for (int r = 1; r < config_.world_size; ++r) {
        if (peers_[r].valid() && !ready[r]) {
          fds.push_back({peers_[r].get(), POLLIN, 0});
          who.push_back(r);
        }
      }
      check_ready_for_queries(ready, missing);
      int wait_ms = std::min(deadline.remaining_ms(), 100);
      for (const Pending& p : pending) {
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(p.deadline - now).count();
        wait_ms = std::min<int>(wait_ms, static_cast<int>(std::max<int64_t>(left, 0)) + 1);
      }
      int rc = ::poll(fds.data(), fds.size(), wait_ms);
      if (rc < 0 && errno != EINTR) fail(Status::internal, "poll: " + errno_text(errno));
      if (rc <= 0) continue;
      const size_t first_member = listeners.size() + pending.size();
      for (size_t i = 0; i < who.size(); ++i) {
        if (!fds[first_member + i].revents) continue;
        // Early ranks already sent their first contribution; leave it queued for the allgather
        // that follows setup, and only act on a departure or a query.
        uint8_t raw[sizeof(MsgHeader)];
        MsgHeader h;
        const ssize_t n = ::recv(peers_[who[i]].get(), raw, sizeof(raw), MSG_PEEK | MSG_DONTWAIT);
        if (n == static_cast<ssize_t>(sizeof(raw)) && wire::parse_header(raw, h) &&
            h.type == static_cast<uint32_t>(MsgType::data)) {
          ready[who[i]] = true;
        } else if (n == 0 || n == static_cast<ssize_t>(sizeof(raw)) ||
                   (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          handle_unexpected(who[i], 0, 0, "bootstrap setup", missing);
        }
      }
      // Handshakes: each advances only by what already arrived.
      size_t kept = 0;
      for (size_t i = 0; i < pending.size(); ++i) {
        Step step = Step::wait;
        int joined = -1;
        if (fds[listeners.size() + i].revents) step = advance(pending[i], joined);
        if (step == Step::joined) {
          peers_[static_cast<size_t>(joined)] = std::move(pending[i].fd);
          continue;
        }
        if (step == Step::drop) {
          drop(pending[i]);
          continue;
        }
        if (kept != i) pending[kept] = std::move(pending[i]);
        ++kept;
      }
      pending.resize(kept);
      for (size_t l = 0; l < listeners.size(); ++l) {
        if (!(fds[l].revents & POLLIN)) continue;
        for (;;) {
          Fd conn(::accept4(listeners[l].get(), nullptr, nullptr, SOCK_CLOEXEC));
          if (!conn.valid()) break;  // EAGAIN: taken them all
          set_socket_options(conn.get());
          if (pending.size() >= kMaxPendingConnections) {
            drop(pending.front());
            pending.erase(pending.begin());
          }
          Pending p;
          p.fd = std::move(conn);
          p.deadline = Clock::now() + std::chrono::milliseconds(kHandshakeMs);
          pending.push_back(std::move(p));
        }
      }
    }
  }

  // -------- setup: members --------

  // The handshake on a fresh connection to what should be rank 0. Returns "" once the root has
  // proved the key and our hello is sent, else why this connection is not the root.
  std::string handshake(int fd, const Deadline& deadline, bool& wrong_key) {
    wire::Nonce member_nonce, root_nonce;
    random_bytes(member_nonce.data(), member_nonce.size());
    const auto greeting = wire::make_greeting(member_nonce);
    IoResult io = send_all(fd, greeting.data(), greeting.size(), deadline);
    if (io.io != Io::ok) return "sending the greeting: " + closed_text(io);
    uint8_t challenge[wire::kChallengeBytes];
    io = recv_all(fd, challenge, sizeof(challenge), deadline);
    if (io.io == Io::timeout) return "the process at " + where() + " did not answer the greeting";
    if (io.io != Io::ok) return "waiting for the root's challenge: " + closed_text(io);
    switch (wire::check_challenge(challenge, key_, member_nonce, root_nonce)) {
      case wire::ChallengeCheck::ok: break;
      case wire::ChallengeCheck::not_ferry:
        return "the process at " + where() + " does not speak Ferry's bootstrap protocol";
      case wire::ChallengeCheck::wrong_version:
        return "the process at " + where() + " runs another version of Ferry's bootstrap";
      case wire::ChallengeCheck::wrong_key:
        wrong_key = true;
        return "the process at " + where() + " failed the job-key check (job key " +
               key_description_ +
               "): another job holds the port, or rank 0 runs with another FERRY_JOB_KEY or "
               "launcher job id";
    }
    const auto hello = wire::make_hello(key_, root_nonce, member_nonce, config_.rank,
                                        config_.world_size);
    io = send_all(fd, hello.data(), hello.size(), deadline);
    if (io.io != Io::ok) return "sending the hello: " + closed_text(io);
    return "";
  }

  void connect_root(const Deadline& deadline) {
    std::string last_error = "no attempt made";
    std::string key_error;
    int delay_ms = 10;
    const std::string port = std::to_string(config_.master_port);
    for (;;) {
      addrinfo hints{};
      hints.ai_family = AF_UNSPEC;
      hints.ai_socktype = SOCK_STREAM;
      addrinfo* list = nullptr;
      int gai = ::getaddrinfo(config_.master_addr.c_str(), port.c_str(), &hints, &list);
      if (gai != 0) {
        last_error = "cannot resolve '" + config_.master_addr + "': " + gai_strerror(gai);
      }
      for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
        Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
        if (!fd.valid()) {
          last_error = "socket: " + errno_text(errno);
          continue;
        }
        set_socket_options(fd.get());
        int rc = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
          Deadline attempt(std::min(deadline.remaining_ms(), 1000));
          IoResult w = wait_fd(fd.get(), POLLOUT, attempt);
          int err = 0;
          socklen_t len = sizeof(err);
          if (w.io == Io::timeout) {
            err = ETIMEDOUT;
          } else {
            ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
          }
          rc = err == 0 ? 0 : -1;
          errno = err;
        }
        if (rc != 0) {
          last_error = "connect: " + errno_text(errno);
          continue;
        }
        Deadline attempt(std::min(deadline.remaining_ms(), kHandshakeMs));
        bool wrong_key = false;
        std::string problem = handshake(fd.get(), attempt, wrong_key);
        if (problem.empty()) {
          ::freeaddrinfo(list);
          root_ = std::move(fd);
          return;
        }
        last_error = problem;
        if (wrong_key) key_error = problem;
      }
      if (list) ::freeaddrinfo(list);
      if (deadline.expired()) {
        // A listener without the key explains the failure better than whatever the last attempt
        // met (a refused connection once that listener gave up).
        fail(Status::timeout, "bootstrap setup timed out after " +
                                  std::to_string(config_.timeout_ms) + " ms: could not reach " +
                                  root_name() + ": " + (key_error.empty() ? last_error : key_error));
      }
      // The root may simply not be up yet (torchrun starts ranks in any order).
      std::this_thread::sleep_for(
          std::chrono::milliseconds(std::min(delay_ms, deadline.remaining_ms())));
      delay_ms = std::min(delay_ms * 2, 200);
    }
  }

  // -------- allgather --------

  // Root: something arrived from a member that already contributed to allgather #seq (or, during
  // setup, from a member that is connected but not ready).
  void handle_unexpected(int rank, uint64_t seq, uint64_t bytes, const std::string& op,
                         const std::vector<int>& missing) {
    uint8_t raw[sizeof(MsgHeader)];
    MsgHeader h;
    Deadline deadline(2000);
    IoResult r = recv_header(peers_[rank].get(), raw, deadline);
    if (r.io != Io::ok) {
      peers_[rank].reset();
      fail_all(Status::peer_failed, "rank " + std::to_string(rank) + " disconnected during " + op +
                                        " (" + closed_text(r) + ")");
    }
    switch (wire::classify_at_root(raw, seq, bytes, h)) {
      case wire::AtRoot::stale_query: return;
      case wire::AtRoot::query: {
        std::vector<int> late = missing;
        late.erase(std::remove(late.begin(), late.end(), rank), late.end());
        if (late.empty()) late.push_back(0);
        fail_all(Status::timeout, op + " timed out: " + describe_ranks(late) +
                                      " did not arrive (rank " + std::to_string(rank) +
                                      " gave up waiting)" + dropped_note());
      }
      default:
        fail_all(Status::internal, "rank " + std::to_string(rank) +
                                       " sent an unexpected message (type " +
                                       std::to_string(h.type) + ") during " + op);
    }
  }

  void root_allgather(uint64_t seq, size_t bytes, uint8_t* out, int timeout_ms,
                      const Deadline& deadline) {
    const int world = config_.world_size;
    const std::string op =
        "allgather #" + std::to_string(seq) + " (" + std::to_string(bytes) + " bytes per rank)";
    std::vector<bool> arrived(static_cast<size_t>(world), false);
    arrived[0] = true;
    auto missing = [&] {
      std::vector<int> m;
      for (int r = 0; r < world; ++r) {
        if (!arrived[r]) m.push_back(r);
      }
      return m;
    };
    for (;;) {
      std::vector<int> late = missing();
      if (late.empty()) break;
      if (deadline.expired()) {
        fail_all(Status::timeout, op + " timed out after " + std::to_string(timeout_ms) +
                                      " ms: " + describe_ranks(late) + " did not arrive");
      }
      std::vector<pollfd> fds;
      for (int r = 1; r < world; ++r) fds.push_back({peers_[r].get(), POLLIN, 0});
      int rc = ::poll(fds.data(), fds.size(), std::min(deadline.remaining_ms(), 100));
      if (rc < 0 && errno != EINTR) fail(Status::internal, "poll: " + errno_text(errno));
      if (rc <= 0) continue;
      for (int r = 1; r < world; ++r) {
        if (!fds[r - 1].revents) continue;
        if (arrived[r]) {
          handle_unexpected(r, seq, bytes, op, late);
          continue;
        }
        uint8_t raw[sizeof(MsgHeader)];
        MsgHeader h;
        IoResult io = recv_header(peers_[r].get(), raw, deadline);
        if (io.io == Io::closed) {
          peers_[r].reset();
          fail_all(Status::peer_failed, "rank " + std::to_string(r) + " disconnected during " + op +
                                            " (" + closed_text(io) + ")");
        }
        if (io.io == Io::timeout) break;  // reported as a timeout on the next turn
        switch (wire::classify_at_root(raw, seq, bytes, h)) {
          case wire::AtRoot::contribution: break;
          case wire::AtRoot::stale_query: continue;
          case wire::AtRoot::query:
            fail_all(Status::timeout, op + " timed out: rank " + std::to_string(r) +
                                          " gave up before its contribution reached rank 0");
          case wire::AtRoot::wrong_size:
            fail_all(Status::invalid_argument,
                     "rank " + std::to_string(r) + " contributed " + std::to_string(h.bytes) +
                         " bytes to allgather #" + std::to_string(seq) + ", rank 0 contributed " +
                         std::to_string(bytes));
          case wire::AtRoot::out_of_step:
          case wire::AtRoot::garbage:
            fail_all(Status::internal, "rank " + std::to_string(r) + " is out of step: sent " +
                                           "message type " + std::to_string(h.type) + " for #" +
                                           std::to_string(h.seq) + " during " + op);
        }
        if (bytes > 0) {
          io = recv_all(peers_[r].get(), out + bytes * static_cast<size_t>(r), bytes, deadline);
        }
        if (io.io == Io::closed) {
          peers_[r].reset();
          fail_all(Status::peer_failed, "rank " + std::to_string(r) + " disconnected during " + op +
                                            " (" + closed_text(io) + ")");
        }
        if (io.io == Io::timeout) {
          fail_all(Status::timeout, op + " timed out after " + std::to_string(timeout_ms) +
                                        " ms while receiving rank " + std::to_string(r) +
                                        "'s contribution");
        }
        arrived[r] = true;
      }
    }
    const size_t total = bytes * static_cast<size_t>(world);
    for (int r = 1; r < world; ++r) {
      IoResult io = send_msg(peers_[r].get(), MsgType::result, seq, out, total, deadline);
      if (io.io == Io::closed) {
        peers_[r].reset();
        fail_all(Status::peer_failed, "rank " + std::to_string(r) + " disconnected before " +
                                          "receiving the result of " + op + " (" + closed_text(io) +
                                          ")");
      }
      if (io.io == Io::timeout) {
        fail_all(Status::timeout, op + " timed out after " + std::to_string(timeout_ms) +
                                      " ms while sending the result to rank " + std::to_string(r));
      }
    }
  }

  // Reads an abort's text (bounded) and throws it as this rank's error.
  [[noreturn]] void raise_abort(const MsgHeader& h) {
    std::string text(wire::abort_text_bytes(h), '\0');
    // The root sends the whole abort at once; our own deadline may already be spent by now.
    Deadline deadline(kQueryGraceMs);
    if (!text.empty() && recv_all(root_.get(), text.data(), text.size(), deadline).io != Io::ok) {
      text = "operation aborted by rank 0";
    }
    if (text.empty()) text = "operation aborted by rank 0";
    fail(wire::abort_status(h), text);
  }

  // The root's connection broke. A root that failed the operation sent an abort before leaving,
  // and that abort (naming the rank to blame) may still be queued here: prefer it.
  [[noreturn]] void root_gone(const std::string& op, const IoResult& io) {
    uint8_t raw[sizeof(MsgHeader)];
    MsgHeader h;
    Deadline drain(200);
    if (recv_header(root_.get(), raw, drain).io == Io::ok &&
        wire::classify_at_member(raw, 0, 0, h) == wire::AtMember::abort) {
      raise_abort(h);
    }
    fail(Status::peer_failed,
         root_name() + " disconnected during " + op + " (" + closed_text(io) + ")");
  }

  void member_allgather(uint64_t seq, const void* in, size_t bytes, uint8_t* out, int timeout_ms,
                        const Deadline& deadline) {
    const std::string op =
        "allgather #" + std::to_string(seq) + " (" + std::to_string(bytes) + " bytes per rank)";
    IoResult io = send_msg(root_.get(), MsgType::data, seq, in, bytes, deadline);
    if (io.io == Io::closed) root_gone(op, io);
    // A send that times out means the root is not reading: ask it below, as for a late result.
    uint8_t raw[sizeof(MsgHeader)];
    if (io.io == Io::ok) io = recv_header(root_.get(), raw, deadline);
    if (io.io == Io::closed) root_gone(op, io);
    if (io.io == Io::timeout) {
      // Our clock ran out, but the root knows who is missing: ask it, briefly.
      Deadline grace(kQueryGraceMs);
      send_msg(root_.get(), MsgType::query, seq, nullptr, 0, grace);
      io = recv_header(root_.get(), raw, grace);
      if (io.io != Io::ok) {
        fail(Status::timeout, op + " timed out after " + std::to_string(timeout_ms) +
                                  " ms: " + root_name() + " did not complete it");
      }
    }
    const size_t total = bytes * static_cast<size_t>(config_.world_size);
    MsgHeader h;
    switch (wire::classify_at_member(raw, seq, total, h)) {
      case wire::AtMember::result: break;
      case wire::AtMember::abort: raise_abort(h);
      case wire::AtMember::garbage: fail(Status::internal, "garbage from rank 0 during " + op);
      case wire::AtMember::out_of_step:
        fail(Status::internal, "rank 0 is out of step: sent message type " +
                                   std::to_string(h.type) + " for #" + std::to_string(h.seq) +
                                   " (" + std::to_string(h.bytes) + " bytes) during " + op);
    }
    if (total == 0) return;
    // The result may arrive after the query's grace started; give its payload the longer deadline.
    Deadline payload_deadline(std::max(deadline.remaining_ms(), kQueryGraceMs));
    io = recv_all(root_.get(), out, total, payload_deadline);
    if (io.io != Io::ok) {
      fail(io.io == Io::closed ? Status::peer_failed : Status::timeout,
           "receiving the result of " + op + " from " + root_name() + ": " +
               (io.io == Io::closed ? closed_text(io) : std::string("timed out")));
    }
    // Our own contribution came back through the root; keep the caller's bytes authoritative.
    std::memmove(out + bytes * static_cast<size_t>(config_.rank), in, bytes);
  }

  TcpBootstrapConfig config_;
  Digest key_{};
  std::string key_description_;
  int local_rank_ = -1;
  int local_size_ = -1;
  uint64_t seq_ = 0;
  std::vector<Fd> peers_;  // root only: one connection per rank (index 0 unused)
  Fd root_;                // non-root only
  size_t unproven_connections_ = 0;  // root only: challenged, then closed without a valid hello
  std::string failure_;
  Status failure_status_ = Status::ok;
};

// ------------------------------------------------------------------------------------------------
// Callback

class CallbackBootstrap final : public Bootstrap {
 public:
  explicit CallbackBootstrap(const BootstrapCallbacks& callbacks) : cb_(callbacks) {
    if (cb_.allgather == nullptr) {
      raise(Status::invalid_argument, "callback bootstrap: allgather callback is null");
    }
    if (cb_.world_size < 1 || cb_.rank < 0 || cb_.rank >= cb_.world_size) {
      raise(Status::invalid_argument, "callback bootstrap: rank " + std::to_string(cb_.rank) +
                                          " is outside world_size " +
                                          std::to_string(cb_.world_size));
    }
    validate_locality("callback bootstrap", cb_.rank, cb_.local_rank, cb_.local_size);
    if (cb_.local_rank < 0 || cb_.local_size < 0) {
      resolve_locality(*this, 0, cb_.local_rank, cb_.local_size);
    }
  }
  int rank() const override { return cb_.rank; }
  int world_size() const override { return cb_.world_size; }
  int local_rank() const override { return cb_.local_rank; }
  int local_size() const override { return cb_.local_size; }

  // The caller's process group owns its own deadlines; timeout_ms cannot be imposed on it.
  void allgather(const void* in, size_t bytes, void* out, int /*timeout_ms*/) override {
    int rc = cb_.allgather(cb_.context, in, bytes, out);
    if (rc != 0) {
      raise(Status::transport, "callback bootstrap rank " + std::to_string(cb_.rank) +
                                   ": allgather callback of " + std::to_string(bytes) +
                                   " bytes returned " + std::to_string(rc));
    }
  }

 private:
  BootstrapCallbacks cb_;
};

}  // namespace

std::unique_ptr<Bootstrap> make_tcp_bootstrap(const TcpBootstrapConfig& config) {
  return std::make_unique<TcpBootstrap>(config);
}

std::unique_ptr<Bootstrap> make_callback_bootstrap(const BootstrapCallbacks& callbacks) {
  return std::make_unique<CallbackBootstrap>(callbacks);
}

std::unique_ptr<Bootstrap> bootstrap_from_env(int timeout_ms) {
  const LaunchEnv env = read_launch_env();
  if (env.launcher == Launcher::none) {
    raise(Status::invalid_argument,
          "bootstrap_from_env: no launcher found in the environment: none of RANK/WORLD_SIZE "
          "(torchrun, with MASTER_ADDR and MASTER_PORT), OMPI_COMM_WORLD_RANK (mpirun), PMI_RANK or "
          "PMIX_RANK (MPI launchers), SLURM_PROCID/SLURM_NTASKS (srun) is set");
  }
  if (env.has_master() || env.world_size == 1) {
    TcpBootstrapConfig config;
    // A world of one listens nowhere: any address and port do.
    config.master_addr = env.has_master() ? env.master_addr : "127.0.0.1";
    config.master_port = env.has_master() ? env.master_port : 1;
    config.rank = env.rank;
    config.world_size = env.world_size;
    if (env.local_size > 0) {
      config.local_rank = env.local_rank;
      config.local_size = env.local_size;
    } else if (env.local_rank >= 0 && env.world_size > 1) {
      config.local_rank = env.local_rank;
    }
    config.timeout_ms = timeout_ms;
    return make_tcp_bootstrap(config);
  }
  if (env.under_mpi()) {
#ifdef FERRY_HAVE_MPI
    return make_mpi_bootstrap();
#else
    raise(Status::unsupported, "bootstrap_from_env: launched by MPI (" + env.source +
                                   ") but Ferry was built without MPI; rebuild with FERRY_MPI=ON "
                                   "or set MASTER_ADDR and MASTER_PORT for a TCP rendezvous");
#endif
  }
  std::string missing = env.master_addr.empty() ? "MASTER_ADDR" : "";
  if (env.master_port <= 0) missing += std::string(missing.empty() ? "" : ", ") + "MASTER_PORT";
  raise(Status::invalid_argument,
        "bootstrap_from_env: rank " + std::to_string(env.rank) + " of " +
            std::to_string(env.world_size) + " (from " + env.source +
            ") has no rendezvous: missing " + missing +
            " (torchrun sets MASTER_ADDR and MASTER_PORT; under srun, SLURM_JOB_ID and "
            "SLURM_STEP_NODELIST name one)");
}

}  // namespace ferry::te

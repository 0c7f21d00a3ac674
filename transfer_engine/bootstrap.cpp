// TCP rendezvous through rank 0, the callback bootstrap, and launcher detection from the
// environment.
//
// Wire protocol (rank 0 is a star hub): every message is a fixed header followed by `bytes`
// payload.
//   hello   non-root -> root, once after connecting: rank and world size
//   data    non-root -> root: this rank's contribution to allgather #seq
//   result  root -> non-root: the whole rank-major allgather #seq
//   abort   root -> non-root: the operation failed; payload is the error text, seq the Status
//   query   non-root -> root: "my deadline for #seq passed; who is missing?" The root answers with
//           an abort naming the missing ranks, so every rank reports the same culprit even when
//           their clocks started at slightly different times.
// All ranks of one job run the same build, so the header is sent in host byte order.
#include "transfer_engine/bootstrap.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "transfer_engine/error.h"

namespace ferry::te {

void Bootstrap::barrier(int timeout_ms) {
  // A one-byte allgather: nobody leaves before everybody has arrived.
  uint8_t token = 1;
  std::vector<uint8_t> all(static_cast<size_t>(world_size()));
  allgather(&token, 1, all.data(), timeout_ms);
}

namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kMagic = 0x46725942;  // "FrYB"
constexpr size_t kHostNameBytes = 256;
// How long a rank whose own deadline passed waits for the root to say who is missing.
constexpr int kQueryGraceMs = 2000;
// How long the root spends telling the others that an operation failed.
constexpr int kAbortSendMs = 1000;

enum class MsgType : uint32_t { hello = 1, data = 2, result = 3, abort = 4, query = 5 };

struct MsgHeader {
  uint32_t magic = kMagic;
  uint32_t type = 0;
  uint64_t seq = 0;
  uint64_t bytes = 0;
};

struct Hello {
  int32_t rank = 0;
  int32_t world_size = 0;
};

class Deadline {
 public:
  explicit Deadline(int timeout_ms)
      : end_(Clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0))) {}
  int remaining_ms() const {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end_ - Clock::now()).count();
    return left > 0 ? static_cast<int>(std::min<int64_t>(left, 1 << 30)) : 0;
  }
  bool expired() const { return Clock::now() >= end_; }

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

// "rank 2" or "ranks 2, 5, 7": error messages name the ranks a user has to go and look at.
std::string rank_list(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(ranks[i]);
  }
  return s;
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
  MsgHeader h;
  h.type = static_cast<uint32_t>(type);
  h.seq = seq;
  h.bytes = bytes;
  IoResult r = send_all(fd, &h, sizeof(h), deadline);
  if (r.io != Io::ok || bytes == 0) return r;
  return send_all(fd, payload, bytes, deadline);
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
    const uint64_t seq = seq_++;
    Deadline deadline(timeout_ms);
    std::memmove(static_cast<uint8_t*>(out) + bytes * static_cast<size_t>(config_.rank), in, bytes);
    if (config_.world_size == 1) return;
    if (config_.rank == 0) {
      root_allgather(seq, bytes, static_cast<uint8_t*>(out), timeout_ms, deadline);
    } else {
      member_allgather(seq, in, bytes, static_cast<uint8_t*>(out), timeout_ms, deadline);
    }
  }

 private:
  std::string prefix() const { return "bootstrap rank " + std::to_string(config_.rank) + ": "; }
  std::string root_name() const {
    return "rank 0 (bootstrap root at " + config_.master_addr + ":" +
           std::to_string(config_.master_port) + ")";
  }

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

  // -------- setup --------

  Fd listen_socket(const Deadline& deadline) {
    // Bind every interface, as torchrun's store does: MASTER_ADDR may name an address (NAT, DNS
    // alias) that is not literally configured on this host.
    std::string last_error;
    int delay_ms = 10;
    for (;;) {
      for (int family : {AF_INET6, AF_INET}) {
        Fd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
        if (!fd.valid()) {
          last_error = "socket: " + errno_text(errno);
          continue;
        }
        int one = 1, zero = 0;
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        int rc;
        if (family == AF_INET6) {
          ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
          sockaddr_in6 a{};
          a.sin6_family = AF_INET6;
          a.sin6_addr = in6addr_any;
          a.sin6_port = htons(static_cast<uint16_t>(config_.master_port));
          rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
        } else {
          sockaddr_in a{};
          a.sin_family = AF_INET;
          a.sin_addr.s_addr = htonl(INADDR_ANY);
          a.sin_port = htons(static_cast<uint16_t>(config_.master_port));
          rc = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a));
        }
        if (rc == 0 && ::listen(fd.get(), 1024) == 0) {
          set_socket_options(fd.get());
          return fd;
        }
        last_error =
            "bind/listen on port " + std::to_string(config_.master_port) + ": " + errno_text(errno);
        if (errno == EADDRINUSE) break;  // IPv4 would collide the same way; wait and retry
      }
      // A previous job on this port may still be shutting down: retry until the deadline.
      if (deadline.expired()) {
        fail(Status::transport, "cannot listen as bootstrap root: " + last_error);
      }
      std::this_thread::sleep_for(
          std::chrono::milliseconds(std::min(delay_ms, deadline.remaining_ms())));
      delay_ms = std::min(delay_ms * 2, 200);
    }
  }

  // Reads the hello of a freshly accepted connection. Returns the rank, or -1 for a connection
  // that is not one of ours (wrong magic, closed early), which is simply dropped.
  int read_hello(int fd, const Deadline& deadline) {
    Deadline hello_deadline(std::min(deadline.remaining_ms(), 2000));
    MsgHeader h;
    Hello hello;
    if (recv_all(fd, &h, sizeof(h), hello_deadline).io != Io::ok) return -1;
    if (h.magic != kMagic || h.type != static_cast<uint32_t>(MsgType::hello) ||
        h.bytes != sizeof(Hello)) {
      return -1;
    }
    if (recv_all(fd, &hello, sizeof(hello), hello_deadline).io != Io::ok) return -1;
    std::string problem;
    if (hello.world_size != config_.world_size) {
      problem = "rank " + std::to_string(hello.rank) + " was started with world_size " +
                std::to_string(hello.world_size) + ", rank 0 with " +
                std::to_string(config_.world_size);
    } else if (hello.rank <= 0 || hello.rank >= config_.world_size) {
      problem = "a process claims rank " + std::to_string(hello.rank) + " outside world_size " +
                std::to_string(config_.world_size);
    } else if (peers_[hello.rank].valid()) {
      problem = "two processes claim rank " + std::to_string(hello.rank);
    }
    if (!problem.empty()) {
      // The newcomer is not among peers_ yet: tell it first, or it would only see rank 0 leave.
      std::string message = problem + " (reported by rank 0)";
      Deadline abort_deadline(kAbortSendMs);
      send_msg(fd, MsgType::abort, static_cast<uint64_t>(Status::invalid_argument), message.data(),
               message.size(), abort_deadline);
      fail_all(Status::invalid_argument, problem);
    }
    return hello.rank;
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
    constexpr size_t kPeekBytes = 2 * sizeof(MsgHeader) + kHostNameBytes;
    uint8_t buf[kPeekBytes];
    for (int r = 1; r < config_.world_size; ++r) {
      if (!ready[r]) continue;
      ssize_t n = ::recv(peers_[r].get(), buf, sizeof(buf), MSG_PEEK | MSG_DONTWAIT);
      MsgHeader first, second;
      if (n < static_cast<ssize_t>(sizeof(first))) continue;
      std::memcpy(&first, buf, sizeof(first));
      size_t next = sizeof(first) + first.bytes;
      if (first.bytes > kHostNameBytes || n < static_cast<ssize_t>(next + sizeof(second))) continue;
      std::memcpy(&second, buf + next, sizeof(second));
      if (second.magic == kMagic && second.type == static_cast<uint32_t>(MsgType::query)) {
        fail_all(Status::timeout, "bootstrap setup timed out: " + rank_list(missing) +
                                      " did not connect to rank 0 (rank " + std::to_string(r) +
                                      " gave up waiting)");
      }
    }
  }

  void accept_all(const Deadline& deadline) {
    Fd listener = listen_socket(deadline);
    const std::string where = config_.master_addr + ":" + std::to_string(config_.master_port);
    std::vector<bool> ready(static_cast<size_t>(config_.world_size), false);
    for (;;) {
      std::vector<int> missing = missing_peers();
      if (missing.empty()) return;
      if (deadline.expired()) {
        fail_all(Status::timeout,
                 "bootstrap setup timed out after " + std::to_string(config_.timeout_ms) +
                     " ms: " + rank_list(missing) + " did not connect to rank 0 at " + where);
      }
      // Connected ranks are watched too: one that leaves or gives up must fail setup now, not at
      // the deadline.
      std::vector<pollfd> fds{{listener.get(), POLLIN, 0}};
      std::vector<int> who{0};
      for (int r = 1; r < config_.world_size; ++r) {
        if (peers_[r].valid() && !ready[r]) {
          fds.push_back({peers_[r].get(), POLLIN, 0});
          who.push_back(r);
        }
      }
      check_ready_for_queries(ready, missing);
      int rc = ::poll(fds.data(), fds.size(), std::min(deadline.remaining_ms(), 100));
      if (rc < 0 && errno != EINTR) fail(Status::internal, "poll: " + errno_text(errno));
      if (rc <= 0) continue;
      for (size_t i = 1; i < fds.size(); ++i) {
        if (!fds[i].revents) continue;
        // Early ranks already sent their first contribution; leave it queued for the allgather
        // that follows setup, and only act on a departure or a query.
        MsgHeader h;
        ssize_t n = ::recv(peers_[who[i]].get(), &h, sizeof(h), MSG_PEEK | MSG_DONTWAIT);
        if (n == static_cast<ssize_t>(sizeof(h)) && h.magic == kMagic &&
            h.type == static_cast<uint32_t>(MsgType::data)) {
          ready[who[i]] = true;
        } else if (n == 0 || n == static_cast<ssize_t>(sizeof(h)) ||
                   (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
          handle_unexpected(who[i], 0, "bootstrap setup", missing);
        }
      }
      if (fds[0].revents & POLLIN) {
        Fd conn(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (!conn.valid()) continue;
        set_socket_options(conn.get());
        int r = read_hello(conn.get(), deadline);
        if (r > 0) peers_[r] = std::move(conn);
      }
    }
  }

  void connect_root(const Deadline& deadline) {
    std::string last_error = "no attempt made";
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
        if (rc == 0) {
          Hello hello{config_.rank, config_.world_size};
          IoResult s = send_msg(fd.get(), MsgType::hello, 0, &hello, sizeof(hello), deadline);
          if (s.io == Io::ok) {
            ::freeaddrinfo(list);
            root_ = std::move(fd);
            return;
          }
          last_error = "sending hello: " + closed_text(s);
        } else {
          last_error = "connect: " + errno_text(errno);
        }
      }
      if (list) ::freeaddrinfo(list);
      if (deadline.expired()) {
        fail(Status::timeout, "bootstrap setup timed out after " +
                                  std::to_string(config_.timeout_ms) + " ms: could not reach " +
                                  root_name() + ": " + last_error);
      }
      // The root may simply not be up yet (torchrun starts ranks in any order).
      std::this_thread::sleep_for(
          std::chrono::milliseconds(std::min(delay_ms, deadline.remaining_ms())));
      delay_ms = std::min(delay_ms * 2, 200);
    }
  }

  // -------- allgather --------

  // Root: something arrived from `rank` that is not a contribution we wait for.
  void handle_unexpected(int rank, uint64_t seq, const std::string& op,
                         const std::vector<int>& missing) {
    MsgHeader h;
    Deadline deadline(2000);
    IoResult r = recv_all(peers_[rank].get(), &h, sizeof(h), deadline);
    if (r.io != Io::ok) {
      peers_[rank].reset();
      fail_all(Status::peer_failed, "rank " + std::to_string(rank) + " disconnected during " + op +
                                        " (" + closed_text(r) + ")");
    }
    if (h.magic == kMagic && h.type == static_cast<uint32_t>(MsgType::query)) {
      if (h.seq < seq) return;  // a stale question about an operation that completed since
      std::vector<int> late = missing;
      late.erase(std::remove(late.begin(), late.end(), rank), late.end());
      if (late.empty()) late.push_back(0);
      fail_all(Status::timeout, op + " timed out: " + rank_list(late) + " did not arrive (rank " +
                                    std::to_string(rank) + " gave up waiting)");
    }
    fail_all(Status::internal, "rank " + std::to_string(rank) + " sent an unexpected message " +
                                   std::to_string(h.type) + " during " + op);
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
                                      " ms: " + rank_list(late) + " did not arrive");
      }
      std::vector<pollfd> fds;
      for (int r = 1; r < world; ++r) fds.push_back({peers_[r].get(), POLLIN, 0});
      int rc = ::poll(fds.data(), fds.size(), std::min(deadline.remaining_ms(), 100));
      if (rc < 0 && errno != EINTR) fail(Status::internal, "poll: " + errno_text(errno));
      if (rc <= 0) continue;
      for (int r = 1; r < world; ++r) {
        if (!fds[r - 1].revents) continue;
        if (arrived[r]) {
          handle_unexpected(r, seq, op, late);
          continue;
        }
        MsgHeader h;
        IoResult io = recv_all(peers_[r].get(), &h, sizeof(h), deadline);
        if (io.io == Io::closed) {
          peers_[r].reset();
          fail_all(Status::peer_failed, "rank " + std::to_string(r) + " disconnected during " + op +
                                            " (" + closed_text(io) + ")");
        }
        if (io.io == Io::timeout) break;  // reported as a timeout on the next turn
        if (h.magic == kMagic && h.type == static_cast<uint32_t>(MsgType::query)) {
          if (h.seq < seq) continue;
          fail_all(Status::timeout, op + " timed out: rank " + std::to_string(r) +
                                        " gave up before its contribution reached rank 0");
        }
        if (h.magic != kMagic || h.type != static_cast<uint32_t>(MsgType::data) || h.seq != seq) {
          fail_all(Status::internal, "rank " + std::to_string(r) + " is out of step: sent " +
                                         "message type " + std::to_string(h.type) + " for #" +
                                         std::to_string(h.seq) + " during " + op);
        }
        if (h.bytes != bytes) {
          fail_all(Status::invalid_argument, "rank " + std::to_string(r) + " contributed " +
                                                 std::to_string(h.bytes) + " bytes to allgather #" +
                                                 std::to_string(seq) + ", rank 0 contributed " +
                                                 std::to_string(bytes));
        }
        io = recv_all(peers_[r].get(), out + bytes * static_cast<size_t>(r), bytes, deadline);
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

  // Reads an abort's text and throws it as this rank's error.
  [[noreturn]] void raise_abort(const MsgHeader& h) {
    std::string text(std::min<uint64_t>(h.bytes, 1 << 16), '\0');
    // The root sends the whole abort at once; our own deadline may already be spent by now.
    Deadline deadline(kQueryGraceMs);
    if (recv_all(root_.get(), text.data(), text.size(), deadline).io != Io::ok) {
      text = "operation aborted by rank 0";
    }
    auto status = static_cast<Status>(h.seq);
    if (status == Status::ok || h.seq > static_cast<uint64_t>(Status::internal)) {
      status = Status::internal;
    }
    fail(status, text);
  }

  // The root's connection broke. A root that failed the operation sent an abort before leaving,
  // and that abort (naming the rank to blame) may still be queued here: prefer it.
  [[noreturn]] void root_gone(const std::string& op, const IoResult& io) {
    MsgHeader h;
    Deadline drain(200);
    if (recv_all(root_.get(), &h, sizeof(h), drain).io == Io::ok && h.magic == kMagic &&
        h.type == static_cast<uint32_t>(MsgType::abort)) {
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
    MsgHeader h;
    if (io.io == Io::ok) io = recv_all(root_.get(), &h, sizeof(h), deadline);
    if (io.io == Io::closed) root_gone(op, io);
    if (io.io == Io::timeout) {
      // Our clock ran out, but the root knows who is missing: ask it, briefly.
      Deadline grace(kQueryGraceMs);
      send_msg(root_.get(), MsgType::query, seq, nullptr, 0, grace);
      io = recv_all(root_.get(), &h, sizeof(h), grace);
      if (io.io != Io::ok) {
        fail(Status::timeout, op + " timed out after " + std::to_string(timeout_ms) +
                                  " ms: " + root_name() + " did not complete it");
      }
    }
    if (h.magic != kMagic) fail(Status::internal, "garbage from rank 0 during " + op);
    if (h.type == static_cast<uint32_t>(MsgType::abort)) raise_abort(h);
    const size_t total = bytes * static_cast<size_t>(config_.world_size);
    if (h.type != static_cast<uint32_t>(MsgType::result) || h.seq != seq || h.bytes != total) {
      fail(Status::internal, "rank 0 is out of step: sent message type " + std::to_string(h.type) +
                                 " for #" + std::to_string(h.seq) + " (" + std::to_string(h.bytes) +
                                 " bytes) during " + op);
    }
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
  int local_rank_ = -1;
  int local_size_ = -1;
  uint64_t seq_ = 0;
  std::vector<Fd> peers_;  // root only: one connection per rank (index 0 unused)
  Fd root_;                // non-root only
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

// ------------------------------------------------------------------------------------------------
// Environment

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

int env_int(const char* name, int min_value, int max_value) {
  const char* v = env(name);
  int value = 0;
  auto end = v + std::strlen(v);
  auto [ptr, ec] = std::from_chars(v, end, value);
  if (ec != std::errc() || ptr != end || value < min_value || value > max_value) {
    raise(Status::invalid_argument, std::string("bootstrap_from_env: ") + name + "='" + v +
                                        "' is not an integer in [" + std::to_string(min_value) +
                                        ", " + std::to_string(max_value) + "]");
  }
  return value;
}

}  // namespace

std::unique_ptr<Bootstrap> make_tcp_bootstrap(const TcpBootstrapConfig& config) {
  return std::make_unique<TcpBootstrap>(config);
}

std::unique_ptr<Bootstrap> make_callback_bootstrap(const BootstrapCallbacks& callbacks) {
  return std::make_unique<CallbackBootstrap>(callbacks);
}

std::unique_ptr<Bootstrap> bootstrap_from_env(int timeout_ms) {
  static const char* const kTorchrun[] = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"};
  static const char* const kMpi[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"};
  std::vector<std::string> missing;
  for (const char* name : kTorchrun) {
    if (!env(name)) missing.push_back(name);
  }
  if (missing.empty()) {
    TcpBootstrapConfig config;
    config.master_addr = env("MASTER_ADDR");
    config.master_port = env_int("MASTER_PORT", 1, 65535);
    config.world_size = env_int("WORLD_SIZE", 1, 1 << 24);
    config.rank = env_int("RANK", 0, config.world_size - 1);
    if (env("LOCAL_RANK")) config.local_rank = env_int("LOCAL_RANK", 0, config.world_size - 1);
    if (env("LOCAL_WORLD_SIZE")) {
      config.local_size = env_int("LOCAL_WORLD_SIZE", 1, config.world_size);
    }
    config.timeout_ms = timeout_ms;
    return make_tcp_bootstrap(config);
  }
  for (const char* name : kMpi) {
    if (!env(name)) continue;
#ifdef FERRY_HAVE_MPI
    return make_mpi_bootstrap();
#else
    raise(Status::unsupported, std::string("bootstrap_from_env: launched by MPI (") + name +
                                   " is set) but Ferry was built without MPI; rebuild with "
                                   "FERRY_MPI=ON or launch with torchrun-style variables");
#endif
  }
  std::string list;
  for (size_t i = 0; i < missing.size(); ++i) list += (i ? ", " : "") + missing[i];
  raise(Status::invalid_argument,
        "bootstrap_from_env: no launcher found in the environment: missing " + list +
            " (torchrun: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, optional LOCAL_RANK, "
            "LOCAL_WORLD_SIZE), and none of OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK is set "
            "(mpirun/srun)");
}

}  // namespace ferry::te

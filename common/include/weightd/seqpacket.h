// Sending and receiving SOCK_SEQPACKET packets with file descriptors (SCM_RIGHTS).
//
//   WD_RETURN_IF_ERROR(SendPacket(sock, json, {memfd.get()}));
//   WD_ASSIGN_OR_RETURN(Packet p, RecvPacket(sock, 64 * 1024));
//   if (p.eof) ...; if (p.truncated) ...; p.fds are owned (closed when p dies)
//
// Received descriptors are always close-on-exec (MSG_CMSG_CLOEXEC) and owned by the Packet,
// so a peer that sends fds unasked cannot leak them into the receiver.
// Thread-safe as far as the socket is (one sender and one receiver at a time per socket).
#ifndef WEIGHTD_SEQPACKET_H_
#define WEIGHTD_SEQPACKET_H_

#include <sys/un.h>

#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "weightd/unique_fd.h"

namespace weightd {

struct Packet {
  std::string data;
  std::vector<UniqueFd> fds;
  bool eof = false;          // the peer closed the connection (no data)
  bool truncated = false;    // the packet was longer than max_bytes; data holds the first part
  bool would_block = false;  // non-blocking socket with nothing to read
};

// Sends one packet with up to kMaxFdsPerMessage fds. EAGAIN on a non-blocking socket is
// UNAVAILABLE; other errors carry errno text.
absl::Status SendPacket(int sock, absl::string_view data, std::span<const int> fds = {});

// Receives one packet of at most max_bytes (longer ones are flagged `truncated`).
absl::StatusOr<Packet> RecvPacket(int sock, size_t max_bytes);

// Connects a blocking SOCK_SEQPACKET socket to `path`. Errors name the path.
absl::StatusOr<UniqueFd> ConnectSeqpacket(const std::string& path);

// The AF_UNIX address of `path`; INVALID_ARGUMENT naming the path when it does not fit in
// sun_path (107 bytes).
absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path);

// The daemon's default socket: /run/weightd/weightd.sock for root, else
// $XDG_RUNTIME_DIR/weightd.sock (empty string when XDG_RUNTIME_DIR is unset).
std::string DefaultDaemonSocketPath();

// The socket a client tries by default: $WEIGHTD_SOCKET, else $XDG_RUNTIME_DIR/weightd.sock when
// that exists, else /run/weightd/weightd.sock (the system daemon).
std::string DefaultSocketPath();

}  // namespace weightd

#endif  // WEIGHTD_SEQPACKET_H_

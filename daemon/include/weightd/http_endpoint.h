// HttpEndpoint: weightd's optional HTTP listener (docs/CONFIG.md `metrics_listen`), which serves
// a few fixed GET routes (/metrics, /healthz, /readyz) from the server's own epoll loop.
//
//   WD_ASSIGN_OR_RETURN(ListenAddress a, ParseListenAddress("127.0.0.1:9464", "metrics_listen"));
//   HttpEndpoint::Routes routes = {{"/healthz", [] { return HttpResponse{200, "ok\n"}; }}};
//   WD_ASSIGN_OR_RETURN(auto http, HttpEndpoint::Create({.address = a}, epoll_fd, routes));
//   // in the loop, for each epoll event whose data is HttpEndpoint::IsTag(u64):
//   http->OnEvent(ev.data.u64, ev.events);
//   http->Expire(absl::Now());   // once per wakeup; NextDeadline() bounds the epoll timeout
//
// HTTP/1.0 and 1.1, one request and one response per connection (`Connection: close`), no
// keep-alive, no request bodies. Every socket is non-blocking and every connection bounded: the
// request head may be at most max_request_bytes (else 431), the whole exchange must end within
// request_timeout of the accept (else 408, best effort, and the connection is closed), and at
// most max_connections are open at once (a new one closes the oldest, so idle or trickling
// clients cannot starve a scraper). A route answers GET and HEAD; any other method on it is
// 405 with `Allow: GET, HEAD`; an unknown path is 404; a malformed request line is 400.
//
// The listener sets SO_REUSEPORT so that a successor started with `--takeover` can bind the
// same address while this daemon still runs; a daemon that is not taking over first checks
// that nothing answers on the address (Options::check_in_use), so two daemons configured with
// the same port are still an error.
//
// Thread-safety: not thread-safe. One thread (the server's event loop) calls everything,
// including the route handlers.
#ifndef WEIGHTD_HTTP_ENDPOINT_H_
#define WEIGHTD_HTTP_ENDPOINT_H_

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace weightd {

// A numeric IPv4 or IPv6 address and a TCP port.
struct ListenAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  // "127.0.0.1:9464" or "[::1]:9464" (the port as bound, once Create() has run).
  std::string ToString() const;
  uint16_t port() const;
};

// Parses "HOST:PORT" with a numeric IPv4 host ("127.0.0.1:9464", "0.0.0.0:9464") or a bracketed
// IPv6 one ("[::1]:9464", "[::]:9464"), or a bare port ("9464", meaning 127.0.0.1:9464). Port 0
// asks the kernel for a free port. Host names are refused (the daemon resolves nothing).
// Errors are INVALID_ARGUMENT and start with `what` (the config key or the flag).
absl::StatusOr<ListenAddress> ParseListenAddress(absl::string_view text, absl::string_view what);

struct HttpResponse {
  int status = 200;
  std::string body;
  std::string content_type = "text/plain; charset=utf-8";
};

// The request line of a request head, for the parser below.
struct HttpRequestLine {
  std::string method;  // as sent: "GET"
  std::string path;    // the target without its query or fragment: "/metrics"
};

// The length of the request head at the start of `buffer` through its blank line (CRLF CRLF, or
// LF LF), or npos while the blank line has not arrived.
size_t FindHttpHeadEnd(absl::string_view buffer);

// Parses the request line of `head`. INVALID_ARGUMENT (answered 400) for a malformed line or
// target, UNIMPLEMENTED (answered 505) for an HTTP version other than 1.0 and 1.1.
absl::StatusOr<HttpRequestLine> ParseHttpRequestLine(absl::string_view head);

// The full response text: status line, Content-Type, Content-Length, `Connection: close`,
// `Allow: GET, HEAD` for 405, and the body unless `head_only`.
std::string HttpResponseText(const HttpResponse& response, bool head_only);

class HttpEndpoint {
 public:
  struct Options {
    ListenAddress address;
    size_t max_request_bytes = 8192;
    absl::Duration request_timeout = absl::Seconds(5);
    int max_connections = 64;
    // Refuse to start when something already accepts connections on `address` (false for a
    // `--takeover` successor: its predecessor still listens there until it exits).
    bool check_in_use = true;
  };
  // Handlers run on the loop's thread and must not block.
  using Routes = std::map<std::string, std::function<HttpResponse()>, std::less<>>;

  // Binds and listens, and adds the listener to `epoll_fd` (which must outlive this object).
  // Errors name the address; FAILED_PRECONDITION when something already listens there.
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Create(const Options& options, int epoll_fd,
                                                              Routes routes);
  ~HttpEndpoint();  // closes the listener and every connection
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  // epoll data values of this endpoint: bits 63..62 are 01 (the server's own values have both
  // bits set or both clear).
  static bool IsTag(uint64_t epoll_data) { return (epoll_data >> 62) == 1; }

  // The address bound (with the kernel's port when 0 was asked).
  const ListenAddress& address() const;
  void OnEvent(uint64_t epoll_data, uint32_t events);
  // Closes the connections past their deadline and resumes a listener paused after an accept()
  // failure.
  void Expire(absl::Time now);
  // The earliest deadline of a connection or of a paused listener (InfiniteFuture if none).
  absl::Time NextDeadline() const;
  size_t connections() const;

 private:
  struct Impl;
  explicit HttpEndpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace weightd

#endif  // WEIGHTD_HTTP_ENDPOINT_H_

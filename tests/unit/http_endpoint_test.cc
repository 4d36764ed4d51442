// The HTTP listener's pure parts: listen addresses (and the config key that holds one), request
// heads and response text. The listener itself runs in tests/python/test_metrics_http.py against
// the real daemon.
#include "weightd/http_endpoint.h"

#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "weightd/config.h"

namespace weightd {
namespace {

using ::testing::HasSubstr;

TEST(ListenAddressTest, ParsesIpv4Ipv6AndBarePorts) {
  struct Case {
    const char* text;
    const char* canonical;
  };
  for (const Case& c : {Case{"127.0.0.1:9464", "127.0.0.1:9464"}, Case{"9464", "127.0.0.1:9464"},
                        Case{"0", "127.0.0.1:0"}, Case{"0.0.0.0:9464", "0.0.0.0:9464"},
                        Case{"10.1.2.3:65535", "10.1.2.3:65535"}, Case{"[::1]:9464", "[::1]:9464"},
                        Case{"[::]:80", "[::]:80"}, Case{"[fd00::a:1]:1", "[fd00::a:1]:1"}}) {
    auto a = ParseListenAddress(c.text, "metrics_listen");
    ASSERT_TRUE(a.ok()) << c.text << ": " << a.status();
    EXPECT_EQ(a->ToString(), c.canonical);
  }
}

TEST(ListenAddressTest, ErrorsNameTheKeyAndTheProblem) {
  struct Case {
    const char* text;
    const char* why;
  };
  for (const Case& c :
       {Case{"", "is empty"}, Case{"localhost:9464", "not a numeric IPv4"},
        Case{"::1:9464", "without brackets"}, Case{":9464", "has no host"},
        Case{"127.0.0.1:", "no port"}, Case{"127.0.0.1:65536", "no port"},
        Case{"127.0.0.1:-1", "no port"}, Case{"127.0.0.1:0x10", "no port"},
        Case{"127.0.0.1:000009464", "no port"}, Case{"[::1]", "not [IPv6]:PORT"},
        Case{"[::1:9464", "not [IPv6]:PORT"}, Case{"[nonsense]:1", "not a numeric IPv6"},
        Case{"1.2.3:1", "not a numeric IPv4"}, Case{"x", "no port"}}) {
    auto a = ParseListenAddress(c.text, "--metrics-listen");
    ASSERT_FALSE(a.ok()) << c.text;
    EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(a.status().message(), HasSubstr(absl::StrCat("--metrics-listen: '", c.text, "'")));
    EXPECT_THAT(a.status().message(), HasSubstr(c.why)) << c.text;
    EXPECT_THAT(a.status().message(), HasSubstr("127.0.0.1:9464"));  // says what would do
  }
}

TEST(ListenAddressTest, ConfigKey) {
  auto c = ParseConfig("{}", "w.json");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->metrics_listen, "");  // off by default
  c = ParseConfig(R"({"metrics_listen": "[::]:9464"})", "w.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->metrics_listen, "[::]:9464");
  c = ParseConfig(R"({"metrics_listen": ""})", "w.json");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->metrics_listen, "");
  c = ParseConfig(R"({"metrics_listen": "localhost:1"})", "w.json");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("w.json: key 'metrics_listen': 'localhost:1'"));
  c = ParseConfig(R"({"metrics_listen": 9464})", "w.json");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("key 'metrics_listen' must be a string"));
}

TEST(HttpRequestTest, HeadEnd) {
  EXPECT_EQ(FindHttpHeadEnd("GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), 27u);
  EXPECT_EQ(FindHttpHeadEnd("GET / HTTP/1.1\nHost: x\n\n"), 24u);
  EXPECT_EQ(FindHttpHeadEnd("GET / HTTP/1.1\r\nHost: x\r\n"), absl::string_view::npos);
  EXPECT_EQ(FindHttpHeadEnd(""), absl::string_view::npos);
}

TEST(HttpRequestTest, RequestLine) {
  auto r = ParseHttpRequestLine("GET /metrics?x=1#f HTTP/1.1\r\nHost: x\r\n\r\n");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->method, "GET");
  EXPECT_EQ(r->path, "/metrics");
  r = ParseHttpRequestLine("HEAD /readyz HTTP/1.0\n\n");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->method, "HEAD");
  EXPECT_EQ(ParseHttpRequestLine("GET /metrics HTTP/2.0\r\n\r\n").status().code(),
            absl::StatusCode::kUnimplemented);
  for (const char* bad :
       {"GET /metrics\r\n\r\n", "GET  /metrics HTTP/1.1\r\n\r\n", "get /metrics HTTP/1.1\r\n\r\n",
        "GET metrics HTTP/1.1\r\n\r\n", "GET http://x/metrics HTTP/1.1\r\n\r\n",
        "GET /m\x01 HTTP/1.1\r\n\r\n", "GET /metrics XTTP/1.1\r\n\r\n", "\r\n\r\n", ""}) {
    EXPECT_EQ(ParseHttpRequestLine(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(HttpResponseTest, Text) {
  EXPECT_EQ(HttpResponseText({200, "ok\n"}, false),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\nok\n");
  const std::string head = HttpResponseText({405, "no\n"}, true);
  EXPECT_THAT(head, HasSubstr("HTTP/1.1 405 Method Not Allowed\r\n"));
  EXPECT_THAT(head, HasSubstr("Allow: GET, HEAD\r\n"));
  EXPECT_THAT(head, HasSubstr("Content-Length: 3\r\n"));
  EXPECT_TRUE(absl::EndsWith(head, "\r\n\r\n"));  // HEAD: no body
}

}  // namespace
}  // namespace weightd

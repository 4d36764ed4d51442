"""The daemon's HTTP listener (metrics_listen): /metrics read by the Prometheus project's own text
parser, /healthz, /readyz from the daemon's real state, and clients that misbehave.

Environment (set by ctest): WEIGHTD_BIN, WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python, and
WD_READ_GATE_LIB (tests/support/read_gate.c) to hold a preload in progress until the test lets
it finish.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import weightd

HERE = os.path.dirname(os.path.abspath(__file__))
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


# ---- helpers shared with test_daemon_container_modes.py ----

def make_checkpoint(path, seed=0):
    maker = os.environ.get("WEIGHTD_CHECKPOINT_PYTHON", sys.executable)
    subprocess.run([maker, os.path.join(HERE, "make_demo_checkpoint.py"), path, "--seed", str(seed)],
                   check=True, stdout=subprocess.DEVNULL)


class Daemon:
    """A weightd process on a temporary socket, its log in d/NAME.log."""

    def __init__(self, d, config, args=(), env=None, name="weightd", wait_socket=True):
        self.d = d
        self.socket = config["socket"]
        self.config_path = os.path.join(d, f"{name}.json")
        if not os.path.exists(self.config_path):
            with open(self.config_path, "w") as f:
                json.dump(config, f)
        self.log_path = os.path.join(d, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [os.environ["WEIGHTD_BIN"], "--config", self.config_path, *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.http_port = None
        if wait_socket:
            self.wait_for_log(r"listening for HTTP on [^ ]*:(\d+)" if "--metrics-listen" in args
                              or config.get("metrics_listen") else r"listening on ")

    def text(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_for_log(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                if pattern.startswith("listening for HTTP"):
                    self.http_port = int(m.group(1))
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"weightd exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no /{pattern}/ in the log:\n{self.text()}")
            time.sleep(0.02)

    def client(self):
        return weightd.Client(self.socket)

    def stop(self, timeout=25):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.log.close()
        return rc


def request(port, raw, timeout=5.0, host="127.0.0.1"):
    """Sends `raw` and reads until the server closes: (status, headers dict, body bytes)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    assert int(headers["content-length"]) == len(body) or raw.startswith(b"HEAD"), (headers, body)
    return status, headers, body


def get(port, path, method="GET"):
    return request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def families(text):
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), f"families split or interleaved: {names}"
    return {f.name: f for f in fams}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- one daemon with two models, the listener on a kernel-chosen port ----

@pytest.fixture(scope="module")
def daemon():
    d = tempfile.mkdtemp(prefix="weightd-http-")
    ckpt = os.path.join(d, "demo")
    make_checkpoint(ckpt)
    w = Daemon(d, {"socket": os.path.join(d, "weightd.sock"), "backend": "host", "io_threads": 2,
                   "metrics_listen": "127.0.0.1:0",
                   "preload": [{"name": "demo", "checkpoint": ckpt, "recipe": "hf"},
                               {"name": "llama2", "checkpoint": ckpt, "tp": 2}]})
    c = w.client()
    deadline = time.monotonic() + 30
    while get(w.http_port, "/readyz")[0] != 200:
        assert time.monotonic() < deadline, w.text()
        time.sleep(0.05)
    try:
        yield w, c
    finally:
        c.close()
        rc = w.stop()
        shutil.rmtree(d, ignore_errors=True)
        assert rc == 0, f"weightd exited with {rc}"


def test_port_zero_is_logged(daemon):
    w, _ = daemon
    assert 0 < w.http_port < 65536
    assert f"listening for HTTP on 127.0.0.1:{w.http_port} (/metrics, /healthz, /readyz)" in w.text()


def test_metrics_is_the_same_exposition_as_the_metrics_request(daemon):
    w, c = daemon
    status, headers, body = get(w.http_port, "/metrics")
    assert status == 200
    assert headers["content-type"] == PROMETHEUS_TEXT
    over_http = families(body.decode())
    over_socket = families(c.metrics())
    assert {n: f.type for n, f in over_http.items()} == {n: f.type for n, f in over_socket.items()}
    for f in over_http.values():
        assert f.documentation, f"{f.name} has no HELP line"
    # Values that no request changes are equal; request and connection counters may move.
    moving = {"weightd_requests", "weightd_connections"}
    for name, f in over_http.items():
        if name in moving:
            continue
        assert sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples) == \
            sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                   for s in over_socket[name].samples), name
    ready = {(s.labels["model"], s.labels["rank"]): s.value
             for s in over_http["weightd_rank_ready"].samples}
    assert ready == {("demo", "0"): 1, ("llama2", "0"): 1, ("llama2", "1"): 1}


def test_health_and_readiness(daemon):
    w, _ = daemon
    assert get(w.http_port, "/healthz")[:3:2] == (200, b"ok\n")
    assert get(w.http_port, "/readyz")[:3:2] == (200, b"ready\n")


def test_unknown_paths_are_404_and_other_methods_405(daemon):
    port = daemon[0].http_port
    status, _, body = get(port, "/")
    assert status == 404 and b"/metrics" in body
    assert get(port, "/metricsx")[0] == 404
    assert get(port, "/metrics/")[0] == 404
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        status, headers, _ = get(port, "/metrics", method)
        assert status == 405, method
        assert headers["allow"] == "GET, HEAD"
    assert get(port, "/healthz", "POST")[0] == 405
    assert get(port, "/nowhere", "POST")[0] == 404


def test_head_query_and_http10(daemon):
    port = daemon[0].http_port
    status, headers, body = get(port, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
    assert get(port, "/metrics?name[]=weightd_models")[0] == 200
    status, _, body = request(port, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status == 200 and b"weightd_models 2" in body
    # Bare LF line ends (RFC 9112 lets a server accept them).
    assert request(port, b"GET /healthz HTTP/1.1\nHost: x\n\n")[0] == 200


def test_malformed_requests_are_400_or_505(daemon):
    port = daemon[0].http_port
    for raw in (b"GET\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET metrics HTTP/1.1\r\n\r\n",
                b"get /metrics HTTP/1.1\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n",
                b"GET /metrics FTP/1.1\r\n\r\n", b"\x00\x01\x02\xff\r\n\r\n", b"\r\n\r\n",
                b"GET /met\x00rics HTTP/1.1\r\n\r\n"):
        assert request(port, raw)[0] == 400, raw
    assert request(port, b"GET /metrics HTTP/2.0\r\n\r\n")[0] == 505


def test_a_request_body_is_drained_not_reset(daemon):
    # 405 is sent before the body is read; the daemon then reads and drops the body, so the
    # client reads the whole response instead of a connection reset.
    port = daemon[0].http_port
    body = b"x" * 48 * 1024
    raw = b"POST /metrics HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    assert request(port, raw)[0] == 405


def test_oversized_head_is_431(daemon):
    port = daemon[0].http_port
    raw = b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed while we were still sending
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert data.startswith(b"HTTP/1.1 431 "), data[:100]


def test_hostile_clients_do_not_stall_anyone(daemon):
    w, c = daemon
    port = w.http_port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"GET /metr")
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"GET /metrics HTTP/1.1\r\nX-A: ")
    try:
        for _ in range(20):
            t = time.monotonic()
            assert get(port, "/metrics")[0] == 200
            assert get(port, "/healthz")[0] == 200
            # A stalled loop would take the 5 s request timeout; a busy machine takes far less.
            assert time.monotonic() - t < 3.0
            trickle.sendall(b"a")
        assert c.list()  # the socket protocol is served meanwhile
        # 102 connections against a cap of 64: the oldest were closed to make room.
        closed = 0
        for s in idle:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
        assert closed >= 100 - 64 + 1
    finally:
        for s in idle:
            s.close()
    # A client that never sends anything, or never completes its request, gets 408 (best
    # effort) and is closed.
    silent = socket.create_connection(("127.0.0.1", port))
    for s in (partial, trickle, silent):
        s.settimeout(10)
        t = time.monotonic()
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert time.monotonic() - t < 7
        assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data
        s.close()
    assert get(port, "/healthz")[0] == 200


def test_many_scrapes_in_parallel(daemon):
    import concurrent.futures
    port = daemon[0].http_port
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda _: get(port, "/metrics")[0], range(200)))
    assert results == [200] * 200


# ---- readiness follows the preloads ----

def test_readyz_is_503_until_the_preloads_end():
    gate_lib = os.environ.get("WD_READ_GATE_LIB")
    if not gate_lib:
        pytest.skip("WD_READ_GATE_LIB (tests/support/read_gate.c) is not set")
    d = tempfile.mkdtemp(prefix="weightd-readyz-")
    ckpt = os.path.join(d, "gated-ckpt")
    make_checkpoint(ckpt)
    gate = os.path.join(d, "gate")
    open(gate, "w").close()
    w = Daemon(d, {"socket": os.path.join(d, "weightd.sock"), "backend": "host",
                   "metrics_listen": "127.0.0.1:0",
                   "preload": [{"name": "gated", "checkpoint": ckpt}]},
               env={"LD_PRELOAD": gate_lib, "WD_READ_GATE": gate, "WD_READ_GATE_MATCH": "gated-ckpt"})
    try:
        port = w.http_port
        # Held at the gate: live, not ready, and the socket answers.
        for _ in range(3):
            status, _, body = get(port, "/readyz")
            assert (status, body) == (503, b"not ready: preloads are loading\n")
            assert get(port, "/healthz")[0] == 200
            time.sleep(0.3)
        fams = families(get(port, "/metrics")[2].decode())
        assert [s.value for s in fams["weightd_loads_running"].samples] == [1]
        with w.client() as c:
            assert c.status("gated")["state"] == "loading"
        os.unlink(gate)
        deadline = time.monotonic() + 20
        while get(port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline, w.text()
            time.sleep(0.05)
        with w.client() as c:
            assert c.status("gated")["state"] == "ready"
    finally:
        if os.path.exists(gate):
            os.unlink(gate)
        rc = w.stop()
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0


# ---- addresses ----

def run_weightd(*args, timeout=20):
    return subprocess.run([os.environ["WEIGHTD_BIN"], *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("addr,why", [
    ("localhost:9464", "not a numeric IPv4 address"),
    ("::1:9464", "without brackets"),
    (":9464", "has no host"),
    ("127.0.0.1:65536", "no port in 0..65535"),
    ("127.0.0.1:", "no port"),
    ("[::1]9464", "not [IPv6]:PORT"),
    ("[fe80::1%eth0]:9464", "not a numeric IPv6 address"),
    ("300.0.0.1:1", "not a numeric IPv4 address"),
])
def test_bad_flag_address_is_a_usage_error(addr, why):
    r = run_weightd("--socket", "/nonexistent/x.sock", "--metrics-listen", addr)
    assert r.returncode == 2, r.stderr
    assert f"--metrics-listen: '{addr}'" in r.stderr and why in r.stderr, r.stderr


def test_bad_config_address_names_the_key(tmp_path):
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"metrics_listen": "localhost:80"}))
    r = run_weightd("--config", str(cfg))
    assert r.returncode == 1
    assert f"{cfg}: key 'metrics_listen': 'localhost:80' has 'localhost'" in r.stderr, r.stderr
    cfg.write_text(json.dumps({"metrics_listen": 9464}))
    r = run_weightd("--config", str(cfg))
    assert r.returncode == 1 and "key 'metrics_listen' must be a string" in r.stderr, r.stderr


def test_an_address_in_use_is_refused(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_weightd("--socket", str(tmp_path / "w.sock"), "--backend", "host",
                        "--metrics-listen", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"something already accepts connections on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert not (tmp_path / "w.sock").exists()


def test_bare_port_means_loopback_and_ipv6_works(tmp_path):
    port = free_port()
    w = Daemon(str(tmp_path), {"socket": str(tmp_path / "a.sock"), "backend": "host"},
               args=("--metrics-listen", str(port)), name="a")
    try:
        assert w.http_port == port
        assert f"listening for HTTP on 127.0.0.1:{port} " in w.text()
        assert get(port, "/healthz")[0] == 200
    finally:
        assert w.stop() == 0
    if not socket.has_ipv6:
        return
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback here
    w = Daemon(str(tmp_path), {"socket": str(tmp_path / "b.sock"), "backend": "host"},
               args=("--metrics-listen", "[::1]:0"), name="b")
    try:
        assert request(w.http_port, b"GET /healthz HTTP/1.1\r\n\r\n", host="::1")[0] == 200
    finally:
        assert w.stop() == 0

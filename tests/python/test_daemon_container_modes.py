"""The daemon's options for running in a container (deploy/kubernetes, docs/KUBERNETES.md):
--takeover-if-running, --linger-after-handover, a takeover that keeps the HTTP port, and
--watch-config with a ConfigMap-style update (a symlink swapped to a new directory).

Environment (set by ctest): WEIGHTD_BIN, WEIGHTD_CLIENT_LIB, PYTHONPATH=client/python.
"""
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_metrics_http import Daemon, families, free_port, get, make_checkpoint  # noqa: E402


@pytest.fixture()
def workdir():
    d = tempfile.mkdtemp(prefix="weightd-modes-")
    make_checkpoint(os.path.join(d, "demo"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def wait_until(predicate, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_pod_update_with_takeover_and_linger(workdir):
    """What a DaemonSet rolling update does (maxSurge 1): the new pod's daemon takes over from the
    old one; the old one stays up (its container must not exit and be restarted) until the old pod
    is deleted, answering /healthz 200 and /readyz 503 meanwhile."""
    d = workdir
    sock = os.path.join(d, "weightd.sock")
    config = {"socket": sock, "backend": "host",
              "preload": [{"name": "demo", "checkpoint": os.path.join(d, "demo"), "recipe": "hf"}]}
    args = ("--takeover-if-running", "--linger-after-handover", "--metrics-listen", "127.0.0.1:0")
    old = Daemon(d, config, args=args, name="old")
    new = None
    try:
        assert "takeover: no daemon answers on" in old.text()
        wait_until(lambda: get(old.http_port, "/readyz")[0] == 200, "the first daemon's preload")
        with old.client() as c:
            w = c.attach("demo", backend="numpy")
            before = {k: v.tobytes() for k, v in w.items()}
        new = Daemon(d, config, args=args, name="new")
        new.wait_for_log(r"takeover: confirmed; serving")
        assert "takeover: a daemon answers on" in new.text()
        wait_until(lambda: get(new.http_port, "/readyz")[0] == 200, "the successor's readiness")
        old.wait_for_log(r"answering HTTP \(/readyz 503\), until SIGTERM")
        # The old daemon lingers: live, not ready, no metrics, and holds no socket.
        assert old.proc.poll() is None
        assert get(old.http_port, "/healthz")[0] == 200
        assert get(old.http_port, "/readyz")[0] == 503
        assert get(old.http_port, "/metrics")[0] == 503
        # The ConfigMap both pods mount may change meanwhile: the old daemon leaves the models,
        # now the successor's, alone.
        old.proc.send_signal(signal.SIGHUP)
        old.wait_for_log(r"SIGHUP: handed over to a successor; nothing to reload")
        fams = families(get(new.http_port, "/metrics")[2].decode())
        assert [s.value for s in fams["weightd_models_adopted"].samples] == [1]
        assert [s.value for s in fams["weightd_checkpoint_bytes_read"].samples] == [0]
        with new.client() as c:
            st = c.status("demo")
            assert st["state"] == "ready"
            w2 = c.attach("demo", backend="numpy")
            assert {k: v.tobytes() for k, v in w2.items()} == before
        # The old pod is deleted: its daemon exits at once, leaving the socket to the new one.
        t = time.monotonic()
        assert old.stop() == 0
        assert time.monotonic() - t < 5
        assert os.path.exists(sock)
        with new.client() as c:
            assert [m["name"] for m in c.list()] == ["demo"]
        del w, w2
    finally:
        if new is not None:
            assert new.stop() == 0
        if old.proc.poll() is None:
            old.stop()


def test_takeover_keeps_the_same_http_port(workdir):
    """Two daemons in one network namespace (a host, or pods with hostNetwork): the successor
    binds the port its predecessor still listens on (SO_REUSEPORT)."""
    d = workdir
    port = free_port()
    config = {"socket": os.path.join(d, "weightd.sock"), "backend": "host",
              "metrics_listen": f"127.0.0.1:{port}",
              "preload": [{"name": "demo", "checkpoint": os.path.join(d, "demo"), "recipe": "hf"}]}
    a = Daemon(d, config, name="a")
    b = None
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, "the preload")
        b = Daemon(d, config, args=("--takeover",), name="b")
        assert b.http_port == port
        assert a.proc.wait(timeout=20) == 0
        fams = families(get(port, "/metrics")[2].decode())
        assert [s.value for s in fams["weightd_models_adopted"].samples] == [1]
        assert get(port, "/readyz")[0] == 200
    finally:
        if b is not None:
            assert b.stop() == 0
        a.stop()


def write_configmap_version(d, version, config):
    """Lays out `config` the way the kubelet updates a ConfigMap volume: the file is a symlink
    through ..data, and ..data is swapped atomically to a new timestamped directory."""
    vdir = os.path.join(d, f"..v{version}")
    os.mkdir(vdir)
    with open(os.path.join(vdir, "weightd.json"), "w") as f:
        json.dump(config, f)
    tmp = os.path.join(d, "..data_tmp")
    os.symlink(f"..v{version}", tmp)
    os.rename(tmp, os.path.join(d, "..data"))
    link = os.path.join(d, "weightd.json")
    if not os.path.islink(link):
        os.symlink("..data/weightd.json", link)


def test_watch_config_reloads_a_configmap_update(workdir):
    d = workdir
    cm = os.path.join(d, "configmap")
    os.mkdir(cm)
    base = {"socket": os.path.join(d, "weightd.sock"), "backend": "host",
            "metrics_listen": "127.0.0.1:0"}
    write_configmap_version(cm, 1, base)
    os.symlink(os.path.join(cm, "weightd.json"), os.path.join(d, "w.json"))
    w = Daemon(d, base, args=("--watch-config",), name="w")
    try:
        with w.client() as c:
            assert c.list() == []
        preload = [{"name": "demo", "checkpoint": os.path.join(d, "demo"), "recipe": "hf"}]
        write_configmap_version(cm, 2, {**base, "preload": preload, "log_level": "debug"})

        def loaded():
            with w.client() as c:
                return [(m["name"], m["state"]) for m in c.list()] == [("demo", "ready")]
        wait_until(loaded, "the preload added by the ConfigMap update")
        w.wait_for_log(r"config watch: .*w\.json changed; reloading as on SIGHUP")
        w.wait_for_log(r"SIGHUP: reloaded .*1 preloads started")
        assert w.proc.poll() is None  # reloaded, not restarted
        write_configmap_version(cm, 3, base)

        def unloaded():
            with w.client() as c:
                return c.list() == []
        wait_until(unloaded, "the unload of the preload removed by the next update")
        # A broken update is refused; the daemon keeps running with what it has.
        vdir = os.path.join(cm, "..v4")
        os.mkdir(vdir)
        with open(os.path.join(vdir, "weightd.json"), "w") as f:
            f.write("{not json")
        os.symlink("..v4", os.path.join(cm, "..data_tmp"))
        os.rename(os.path.join(cm, "..data_tmp"), os.path.join(cm, "..data"))
        w.wait_for_log(r"SIGHUP: rejected .*not valid JSON")
        assert get(w.http_port, "/healthz")[0] == 200
    finally:
        assert w.stop() == 0


def test_watch_config_needs_a_config_file():
    import subprocess
    r = subprocess.run([os.environ["WEIGHTD_BIN"], "--watch-config"], capture_output=True, text=True)
    assert r.returncode == 2 and "--watch-config needs --config FILE" in r.stderr

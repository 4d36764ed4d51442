#!/usr/bin/env python3
"""Restart-to-ready of weightd: fd store and --takeover against a fresh warm load.

Usage: restart_bench.py BUILD_DIR [--gb 1.0] [--repeat 3] [--cold]

Method: writes a Llama-named safetensors checkpoint of about --gb GB (random bf16 bit patterns,
32 MiB tensors) and reads it once so it sits in the page cache. Then, for each repeat, with the
host backend and a fake systemd (a datagram NOTIFY_SOCKET that keeps FDSTORE=1 fds, and a
launcher that passes a pre-bound listening socket plus the stored fds through LISTEN_FDS /
LISTEN_FDNAMES / LISTEN_PID):
  1. fresh:    exec weightd whose config preloads the checkpoint -> READY=1 (a warm load);
  2. fdstore:  SIGTERM it, exec a new weightd with the stored fds -> READY=1;
  3. takeover: exec `weightd --takeover` next to the running one -> the first status reply
     whose model has origin "takeover" (only the successor accepts by then).
Each figure is wall time from fork() to that event, so it includes process start. Reported:
best and median of the repeats. With --cold (root: writes /proc/sys/vm/drop_caches) the page
cache is dropped before each fresh start, so "fresh" is a cold load.
"""
import argparse
import array
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_checkpoint(path, gb):
    os.makedirs(path, exist_ok=True)
    tensor_bytes = 32 << 20
    n = max(1, int(gb * 1e9 / tensor_bytes))
    header, offset = {}, 0
    for i in range(n):
        header[f"model.layers.{i}.mlp.down_proj.weight"] = {
            "dtype": "BF16", "shape": [4096, tensor_bytes // 2 // 4096],
            "data_offsets": [offset, offset + tensor_bytes]}
        offset += tensor_bytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 1 << 16, size=tensor_bytes // 2, dtype=np.uint16).tobytes()
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for i in range(n):
            f.write(block)
    return offset


class FakeSystemd:
    def __init__(self, d):
        self.path = os.path.join(d, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.store = {}  # name -> fd
        self.log = []

    def pump(self, timeout):
        self.sock.settimeout(timeout)
        try:
            while True:
                msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 253)
                text = msg.decode()
                self.log.append(text)
                kv = dict(l.split("=", 1) for l in text.split("\n") if "=" in l)
                if kv.get("FDSTORE") == "1":
                    for fd in fds:
                        self.store[kv["FDNAME"]] = fd
                elif kv.get("FDSTOREREMOVE") == "1":
                    os.close(self.store.pop(kv["FDNAME"]))
                self.sock.settimeout(0.0)
        except (BlockingIOError, socket.timeout):
            pass

    def wait_for(self, want, timeout=600):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(want in m for m in self.log):
                return True
            self.pump(0.002)
        raise RuntimeError(f"no {want!r} from weightd: {self.log}")

    def launch(self, listener, argv, log):
        fds = [("control", listener)] + list(self.store.items())
        pid = os.fork()
        if pid == 0:
            high = [os.dup2(fd, 1000 + i, inheritable=True) for i, (_, fd) in enumerate(fds)]
            for i, h in enumerate(high):
                os.dup2(h, 3 + i, inheritable=True)
            e = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(e, 2)
            env = dict(os.environ, LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()),
                       LISTEN_FDNAMES=":".join(n for n, _ in fds), NOTIFY_SOCKET=self.path)
            os.execve(argv[0], argv, env)
        return pid


def call(sock_path, req):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sock_path)
    s.send(b'{"op":"hello","version":1}')
    s.recv(1 << 20)
    s.send(json.dumps(req).encode())
    r = json.loads(s.recv(1 << 22))
    s.close()
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each fresh start")
    a = ap.parse_args()
    weightd = os.path.join(os.path.abspath(a.build), "daemon", "weightd")
    d = tempfile.mkdtemp(prefix="weightd-restart-bench-")
    ckpt = os.path.join(d, "ckpt")
    size = write_checkpoint(ckpt, a.gb)
    subprocess.run(["cat", os.path.join(ckpt, "model.safetensors")], stdout=subprocess.DEVNULL)
    sock_path = os.path.join(d, "weightd.sock")
    cfg = os.path.join(d, "weightd.json")
    with open(cfg, "w") as f:
        json.dump({"socket": sock_path, "backend": "host", "io_threads": 2,
                   "preload": [{"name": "m", "checkpoint": ckpt, "recipe": "hf"}]}, f)
    log = os.path.join(d, "weightd.log")
    argv = [weightd, "--config", cfg]
    res = {"fresh": [], "fdstore": [], "takeover": []}
    for _ in range(a.repeat):
        sd = FakeSystemd(d)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(sock_path)
        listener.listen(4096)
        if a.cold:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3")
        t = time.monotonic()
        p1 = sd.launch(listener.fileno(), argv, log)
        sd.wait_for("READY=1")
        res["fresh"].append(time.monotonic() - t)
        sd.wait_for("FDNAME=wd1.rec.m")
        os.kill(p1, signal.SIGTERM)
        os.waitpid(p1, 0)
        sd.log.clear()
        t = time.monotonic()
        p2 = sd.launch(listener.fileno(), argv, log)
        sd.wait_for("READY=1")
        res["fdstore"].append(time.monotonic() - t)
        st = call(sock_path, {"op": "status", "name": "m"})["result"]["models"][0]
        assert st["origin"] == "fdstore" and st["state"] == "ready", st
        t = time.monotonic()
        p3 = subprocess.Popen(argv + ["--takeover"], stderr=open(log, "a"))
        while True:
            try:
                st = call(sock_path, {"op": "status", "name": "m"})["result"]["models"][0]
                if st["origin"] == "takeover":
                    break
            except (OSError, KeyError, json.JSONDecodeError):
                pass
        res["takeover"].append(time.monotonic() - t)
        os.waitpid(p2, 0)
        p3.terminate()
        p3.wait()
        for fd in sd.store.values():
            os.close(fd)
        sd.sock.close()
        os.unlink(sd.path)
        listener.close()
        if os.path.exists(sock_path):  # the successor removed it at its exit
            os.unlink(sock_path)
    print(f"checkpoint {size / 1e9:.2f} GB, {a.repeat} repeats, fresh start "
          f"{'cold (page cache dropped)' if a.cold else 'warm'}")
    for k, v in res.items():
        print(f"{k:9s} best {min(v) * 1e3:8.1f} ms  median {statistics.median(v) * 1e3:8.1f} ms")
    subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    sys.exit(main())

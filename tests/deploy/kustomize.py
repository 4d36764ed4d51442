"""A minimal `kustomize build` for the kustomizations under deploy/kubernetes, without kubectl.

It implements exactly the features those files use, and refuses everything else, so that what it
renders is what kustomize renders (tests/deploy/test_kubernetes_manifests.py compares the two
wherever `kubectl` is installed):

- `resources`: YAML files of the kustomization's own directory (or below it: kustomize's default
  load restriction), and directories holding a kustomization.yaml, rendered recursively;
  two resources with the same kind, namespace and name are an error;
- `patches`: JSON 6902 patches (a YAML or JSON list of operations, `path` or inline `patch`) with
  a `target` of `kind` and `name` (an anchored regular expression, as in kustomize) that must
  match at least one resource; operations add, remove, replace and test; a patch that changes
  `metadata.name` needs `options: {allowNameChange: true}`; applied in order, before the namespace;
- `namespace`: set on every namespaced resource (the kinds below; cluster-scoped: Namespace).

Output order is resource order (kustomize sorts by kind; compare as sets).

Usage: python3 kustomize.py DIR   (prints the rendered YAML documents)
"""
import copy
import os
import re
import sys

import yaml

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}
PATCH_KEYS = {"path", "patch", "target", "options"}
TARGET_KEYS = {"kind", "name"}
OPTION_KEYS = {"allowNameChange"}
NAMESPACED_KINDS = {"ConfigMap", "DaemonSet", "Deployment", "Service"}
CLUSTER_KINDS = {"Namespace"}


class KustomizeError(Exception):
    pass


def _load_yaml_documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _inside(root, path):
    root = os.path.realpath(root)
    path = os.path.realpath(path)
    return path == root or path.startswith(root + os.sep)


def _resource_id(r):
    return (r.get("kind"), r.get("metadata", {}).get("namespace"), r.get("metadata", {}).get("name"))


# ---- RFC 6902, the operations the patches use ----

def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} does not start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, tokens, path):
    for t in tokens:
        if isinstance(doc, dict):
            if t not in doc:
                raise KustomizeError(f"patch path {path!r}: no member {t!r}")
            doc = doc[t]
        elif isinstance(doc, list):
            if not t.isdigit() or int(t) >= len(doc):
                raise KustomizeError(f"patch path {path!r}: no element {t!r}")
            doc = doc[int(t)]
        else:
            raise KustomizeError(f"patch path {path!r}: {t!r} is inside a scalar")
    return doc


def apply_json6902(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "remove", "replace", "test") or path is None:
            raise KustomizeError(f"unsupported JSON patch operation {op!r}")
        tokens = _pointer(path)
        if not tokens:
            raise KustomizeError("patching the whole document is not supported")
        parent = _walk(doc, tokens[:-1], path)
        last = tokens[-1]
        if kind == "test":
            if _walk(doc, tokens, path) != op["value"]:
                raise KustomizeError(f"test failed at {path!r}: {_walk(doc, tokens, path)!r} != "
                                     f"{op['value']!r}")
        elif isinstance(parent, dict):
            if kind in ("remove", "replace") and last not in parent:
                raise KustomizeError(f"{kind} at {path!r}: no member {last!r}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(copy.deepcopy(op["value"]))
                continue
            if not last.isdigit():
                raise KustomizeError(f"{kind} at {path!r}: {last!r} is not an index")
            i = int(last)
            if kind == "add":
                if i > len(parent):
                    raise KustomizeError(f"add at {path!r}: index out of range")
                parent.insert(i, copy.deepcopy(op["value"]))
            else:
                if i >= len(parent):
                    raise KustomizeError(f"{kind} at {path!r}: index out of range")
                if kind == "remove":
                    del parent[i]
                else:
                    parent[i] = copy.deepcopy(op["value"])
        else:
            raise KustomizeError(f"{kind} at {path!r}: the parent is a scalar")
    return doc


# ---- kustomizations ----

def render(directory):
    """The resources of the kustomization in `directory`, as a list of dicts."""
    kfile = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(kfile):
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    with open(kfile) as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{kfile}: fields this renderer does not implement: {sorted(unknown)}")
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
        raise KustomizeError(f"{kfile}: not a kustomize.config.k8s.io/v1beta1 Kustomization")

    resources = []
    for entry in k.get("resources", []):
        path = os.path.join(directory, entry)
        if os.path.isdir(path):
            resources.extend(render(path))
        elif os.path.isfile(path):
            if not _inside(directory, path):
                raise KustomizeError(f"{kfile}: file {entry!r} is outside the kustomization's "
                                     "directory (kustomize refuses it)")
            resources.extend(_load_yaml_documents(path))
        else:
            raise KustomizeError(f"{kfile}: resource {entry!r} does not exist")
    seen = set()
    for r in resources:
        if r.get("kind") not in NAMESPACED_KINDS | CLUSTER_KINDS:
            raise KustomizeError(f"{kfile}: kind {r.get('kind')!r} is not one this renderer knows "
                                 "to be namespaced or not")
        rid = _resource_id(r)
        if rid in seen:
            raise KustomizeError(f"{kfile}: two resources are {rid}")
        seen.add(rid)

    for p in k.get("patches", []):
        unknown = set(p) - PATCH_KEYS
        target = p.get("target") or {}
        options = p.get("options") or {}
        if unknown or set(target) - TARGET_KEYS or set(options) - OPTION_KEYS or \
                not {"kind", "name"} <= set(target):
            raise KustomizeError(f"{kfile}: unsupported patch {p!r} (this renderer: path or patch, "
                                 "target kind and name, options.allowNameChange)")
        if ("path" in p) == ("patch" in p):
            raise KustomizeError(f"{kfile}: a patch needs exactly one of path and patch")
        if "path" in p:
            ppath = os.path.join(directory, p["path"])
            if not _inside(directory, ppath):
                raise KustomizeError(f"{kfile}: patch file {p['path']!r} is outside the directory")
            with open(ppath) as f:
                ops = yaml.safe_load(f)
        else:
            ops = yaml.safe_load(p["patch"])
        if not isinstance(ops, list):
            raise KustomizeError(f"{kfile}: only JSON 6902 patches (a list of operations) are "
                                 "implemented, not strategic merge patches")
        name_re = re.compile(target["name"])
        hits = 0
        for i, r in enumerate(resources):
            if r["kind"] != target["kind"] or not name_re.fullmatch(r["metadata"]["name"]):
                continue
            patched = apply_json6902(r, ops)
            if patched["metadata"]["name"] != r["metadata"]["name"] and \
                    not options.get("allowNameChange"):
                raise KustomizeError(f"{kfile}: a patch renames {r['metadata']['name']!r} "
                                     "without options.allowNameChange")
            if patched.get("kind") != r["kind"]:
                raise KustomizeError(f"{kfile}: a patch changes a kind")
            resources[i] = patched
            hits += 1
        if hits == 0:
            raise KustomizeError(f"{kfile}: patch target {target} matches no resource")

    ns = k.get("namespace")
    if ns is not None:
        for r in resources:
            if r["kind"] in NAMESPACED_KINDS:
                r.setdefault("metadata", {})["namespace"] = ns
            elif r["kind"] == "Namespace" and r["metadata"]["name"] != ns:
                # What kustomize does to a Namespace object that differs from `namespace` has
                # changed between versions: refuse rather than guess.
                raise KustomizeError(f"{kfile}: Namespace {r['metadata']['name']!r} differs from "
                                     f"namespace {ns!r}")
    seen = set()
    for r in resources:
        rid = _resource_id(r)
        if rid in seen:
            raise KustomizeError(f"{kfile}: two resources are {rid} after the transformations")
        seen.add(rid)
    return resources


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: kustomize.py DIR")
    try:
        docs = render(sys.argv[1])
    except KustomizeError as e:
        sys.exit(f"kustomize.py: {e}")
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=True))

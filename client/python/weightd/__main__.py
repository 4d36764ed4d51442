"""`python -m weightd [--socket PATH] [--json] [NAME]`: the daemon's models, as `weightctl status`
prints them. Exit status 0, 1 on an error (printed on stderr), 2 on a usage error."""
import argparse
import json
import sys

from . import Client, WeightdError, __version__


def _bytes(n):
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000.0
    return str(n)


def _print_model(m):
    gen = m.get("generation", 0)
    line = (f"{m['name']:<20} {m['state']:<9} tp={m['tp']} ranks={len(m['ranks'])} "
            f"{_bytes(m.get('bytes_total', 0))} generation {gen}")
    if m.get("previous_generation"):
        line += f" (previous {m['previous_generation']} kept)"
    print(line)
    if m.get("error"):
        print(f"    error: {m['error']}")
    update = m.get("update")
    if update:
        text = f"    update to generation {update['generation']}: {update['state']}"
        if update.get("error"):
            text += f": {update['error']}"
        print(text)
    for r in m["ranks"]:
        pids = sorted({lease["pid"] for lease in r.get("leases", [])})
        n = r.get("arenas", 0)
        arenas = f" in {n} arena{'s' if n != 1 else ''}" if n else ""
        print(f"    rank {r['rank']}: {r['state']:<9} device {r['device']}, "
              f"{_bytes(r['arena_bytes'])}{arenas}, {r['tensors']} tensors, "
              f"{r['lease_count']} leases"
              + (" pids " + ",".join(map(str, pids)) if pids else ""))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m weightd",
                                description="Shows the models of the weightd daemon.")
    p.add_argument("name", nargs="?", help="show only this model")
    p.add_argument("--socket", help="the daemon's socket (default: $WEIGHTD_SOCKET, ...)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--version", action="version", version=f"weightd (Python) {__version__}")
    args = p.parse_args(argv)
    try:
        with Client(args.socket) as c:
            models = c.status(args.name) if args.name else c.status()
    except WeightdError as e:
        print(f"python -m weightd: {e}", file=sys.stderr)
        return 1
    if args.name:
        models = [models]
    if args.json:
        print(json.dumps({"models": models}, indent=2))
        return 0
    if not models:
        print("no models")
    for m in models:
        _print_model(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())

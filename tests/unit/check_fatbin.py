"""Checks that the kernel fatbin holds exactly what WEIGHTD_CUDA_FATBIN_ARCHS asks for.

    check_fatbin.py FATBIN "80-real;90-real;100"

Reads the fatbin container directly (cuobjdump is not always installed): a 16-byte header
(magic 0xBA55ED50, version, header size, payload size) followed by entries, each with a header
whose first fields are kind (1 = PTX, 2 = ELF/SASS), a version, the entry header size and the
payload size, and whose u32 at byte 28 is the SM architecture. "NN-real" must give SASS for
sm_NN, "NN-virtual" PTX for compute_NN, and a bare "NN" both.
"""
import struct
import sys


def entries(path):
    data = open(path, "rb").read()
    magic, _, header_size, payload = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        sys.exit(f"{path}: not a fatbin (magic {magic:#x})")
    off, end = header_size, header_size + payload
    while off < end:
        kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, off)
        (arch,) = struct.unpack_from("<I", data, off + 28)
        yield {1: "ptx", 2: "sass"}.get(kind, f"kind{kind}"), arch
        off += entry_header + size


def main():
    path, archs = sys.argv[1], sys.argv[2]
    want = set()
    for a in filter(None, archs.split(";")):
        num, _, suffix = a.partition("-")
        num = num.rstrip("abcdefghijklmnopqrstuvwxyz")  # 90a: the container records 90
        if suffix in ("", "real"):
            want.add(("sass", int(num)))
        if suffix in ("", "virtual"):
            want.add(("ptx", int(num)))
    got = set(entries(path))
    print(f"{path}: " + ", ".join(f"{k} sm_{a}" for k, a in sorted(got)))
    if got != want:
        sys.exit(f"{path}: expected {sorted(want)} for WEIGHTD_CUDA_FATBIN_ARCHS={archs}, "
                 f"found {sorted(got)}")


if __name__ == "__main__":
    main()

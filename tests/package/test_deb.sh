#!/usr/bin/env bash
# The Debian package, built from this build tree with cpack, checked from the outside:
#   1. its control data: name, version, architecture, dependencies computed by dpkg-shlibdeps,
#      maintainer scripts, the conffile;
#   2. its files: binaries, the client library with its SONAME links, the C header, pkg-config,
#      units, sysusers.d and tmpfiles.d, the example config, man pages (in step with --help),
#      bash completion;
#   3. unpacked into a scratch root (dpkg-deb -x): its units pass systemd-analyze verify (with
#      ExecStart pointed at the unpacked binary, since verify checks that it exists), and its
#      weightd starts on a socket, loads a test checkpoint, and its weightctl and Python package
#      attach to it.
# Installing system-wide (dpkg -i / -r / --purge) is test_deb_install.sh.
# Usage: test_deb.sh BUILD_DIR CHECKPOINT_WRITER PYTHON
set -euo pipefail
build=$(cd "$1" && pwd)
make_ckpt=$2
python=$3
work=$(mktemp -d /tmp/weightd-deb-XXXXXX)
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

deb=$(bash "$(dirname "$0")/build_deb.sh" "$build" "$work/pkg")
echo "package: $deb"
[[ $(basename "$deb") =~ ^weightd_[0-9]+\.[0-9]+\.[0-9]+_[a-z0-9]+\.deb$ ]] ||
  fail "package file name $(basename "$deb") is not weightd_<version>_<arch>.deb"

# 1. control data
info=$(dpkg-deb -I "$deb")
field() { dpkg-deb -f "$deb" "$1"; }
[[ $(field Package) == weightd ]] || fail "Package: $(field Package)"
[[ $(field Version) == "$(sed -n 's/^project(weightd VERSION \([0-9.]*\).*/\1/p' \
      "$(dirname "$0")/../../CMakeLists.txt")" ]] || fail "Version $(field Version) != project version"
[[ $(field Architecture) == "$(dpkg --print-architecture)" ]] || fail "Architecture"
depends=$(field Depends)
for lib in libc6 libstdc++6 libabsl; do
  [[ $depends == *"$lib"* ]] || fail "Depends lacks $lib (dpkg-shlibdeps): $depends"
done
for script in postinst prerm postrm conffiles; do
  grep -q " $script" <<<"$info" || fail "no $script in the control archive"
done
[[ $(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles) == /etc/weightd/weightd.json ]] ||
  fail "conffiles does not list /etc/weightd/weightd.json"

# 2. files
listing=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
for f in /usr/bin/weightd /usr/bin/weightctl /usr/lib/libweightd_client.so.0 \
         /usr/lib/libweightd_client.so /usr/include/weightd/c_api.h \
         /usr/include/weightd/client.h /usr/include/weightd/dtype.h \
         /usr/lib/libweightd_client_cpp.a /usr/lib/pkgconfig/weightd-client-cpp.pc \
         /usr/lib/pkgconfig/weightd-client.pc /usr/lib/systemd/system/weightd.service \
         /usr/lib/systemd/system/weightd.socket /usr/lib/sysusers.d/weightd.conf \
         /usr/lib/tmpfiles.d/weightd.conf /etc/weightd/weightd.json \
         /usr/share/doc/weightd/weightd.json.example /usr/share/man/man8/weightd.8.gz \
         /usr/share/man/man1/weightctl.1.gz /usr/share/bash-completion/completions/weightctl; do
  grep -qx "$f" <<<"$listing" || fail "the package lacks $f"
done
if grep -q torch <<<"$listing"; then fail "the package carries the LibTorch adapter"; fi

root=$work/root
dpkg-deb -x "$deb" "$root"
soname=$(objdump -p "$root/usr/lib/libweightd_client.so.0" | awk '/SONAME/ {print $2}')
[[ $soname == libweightd_client.so.0 ]] || fail "SONAME is '$soname'"
[[ $(readlink "$root/usr/lib/libweightd_client.so") == libweightd_client.so.0 ]] ||
  fail "libweightd_client.so does not link to the SONAME"
PKG_CONFIG_PATH=$root/usr/lib/pkgconfig pkg-config --libs weightd-client | grep -q -- -lweightd_client ||
  fail "pkg-config weightd-client"
grep -q "^prefix=/usr$" "$root/usr/lib/pkgconfig/weightd-client.pc" || fail "pkg-config prefix"
grep -q "^ExecStart=/usr/bin/weightd " "$root/usr/lib/systemd/system/weightd.service" ||
  fail "weightd.service does not start /usr/bin/weightd"
# Man pages say what --help says: every option of weightctl's global usage is in the page.
for opt in --socket --version wait-generation; do
  zcat "$root/usr/share/man/man1/weightctl.1.gz" | sed 's/\\-/-/g' | grep -q -- "$opt" ||
    fail "weightctl(1) lacks $opt"
done
for section in "EXIT STATUS" "SEE ALSO"; do
  zcat "$root/usr/share/man/man8/weightd.8.gz" | grep -q "^.SH \"*$section" ||
    fail "weightd(8) lacks $section"
done
bash -n "$root/usr/share/bash-completion/completions/weightctl" || fail "completion script syntax"
# The completion offers the commands after the global --socket option.
got=$(bash -c "source '$root/usr/share/bash-completion/completions/weightctl'
  COMP_WORDS=(weightctl --socket /x wa); COMP_CWORD=3; _weightctl; echo \${COMPREPLY[*]}")
[[ $got == wait-generation ]] || fail "completion of 'weightctl --socket /x wa' gave '$got'"

# 3. the unpacked units and binaries
mkdir "$work/units"
sed "s|/usr/bin/weightd|$root/usr/bin/weightd|" "$root/usr/lib/systemd/system/weightd.service" \
  >"$work/units/weightd.service"
cp "$root/usr/lib/systemd/system/weightd.socket" "$work/units/"
out=$(cd "$work/units" && systemd-analyze verify --man=no ./weightd.socket ./weightd.service 2>&1) ||
  fail "systemd-analyze verify: $out"
[[ -z $out ]] || fail "systemd-analyze verify: $out"

"$root/usr/bin/weightd" --version | grep -Eq '^weightd [0-9.]+ \(git [0-9a-f]+' ||
  fail "weightd --version: $("$root/usr/bin/weightd" --version)"
ctl=$root/usr/bin/weightctl
"$ctl" --version | grep -Eq '^weightctl [0-9.]+ \(git ' || fail "weightctl --version"
"$python" "$make_ckpt" "$work/ckpt" >/dev/null
sock=$work/s
"$root/usr/bin/weightd" --socket "$sock" --backend host 2>"$work/weightd.log" &
daemon=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
[[ -S $sock ]] || fail "the unpacked weightd did not listen: $(cat "$work/weightd.log")"
out=$("$ctl" --socket "$sock" load tiny "$work/ckpt" --tp 2 --wait) || fail "load"
# One final line, once (global --socket before the command, as in `git -C`).
[[ $(grep -c '^tiny ' <<<"$out") -eq 1 && $out == *ready* ]] || fail "load --wait printed: $out"
# On a terminal, status follows loads and then prints each model once.
tty_out=$(script -qec "'$ctl' status tiny --socket '$sock'" /dev/null | sed 's/\x1b\[[0-9;]*[A-Za-z]//g')
[[ $(grep -c 'tiny .*ready' <<<"$tty_out") -eq 1 ]] || fail "status on a terminal printed: $tty_out"
"$ctl" --socket "$sock" attach tiny --rank 1 --verify >/dev/null || fail "attach --verify"
# C and C++ programs built against the packaged headers and libraries through pkg-config.
pc() { PKG_CONFIG_PATH=$root/usr/lib/pkgconfig pkg-config --define-variable=prefix="$root/usr" "$@"; }
consumers=$(dirname "$0")/consumers
cc -o "$work/attach_c" "$consumers/attach.c" $(pc --cflags --libs weightd-client) ||
  fail "a C program does not build against the package"
LD_LIBRARY_PATH=$root/usr/lib "$work/attach_c" "$sock" tiny | grep -q '^c: 15 tensors, generation 1$' ||
  fail "the C program could not attach"
c++ -o "$work/attach_cc" "$consumers/attach.cc" $(pc --cflags --libs weightd-client-cpp) ||
  fail "a C++ program does not build against the package"
"$work/attach_cc" "$sock" tiny | grep -q '^c++: 15 tensors' || fail "the C++ program could not attach"
WEIGHTD_CLIENT_LIB=$root/usr/lib/libweightd_client.so PYTHONPATH=$root/usr/share/weightd/python \
  WEIGHTD_SOCKET=$sock "$python" -c '
import weightd
w = weightd.attach("tiny", rank=0, backend="numpy")
assert len(w) > 0 and w.generation == 1, (len(w), w.generation)
' || fail "the packaged Python client could not attach"
echo "package checks passed: $deb"

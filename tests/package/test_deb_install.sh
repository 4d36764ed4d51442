#!/usr/bin/env bash
# The Debian package installed system-wide: dpkg -i, then the installed units, user, daemon and
# client; dpkg -r keeps only the conffile; dpkg --purge removes that and the user and group too,
# and nothing an operator added.
#
# This changes the machine (files under /usr and /etc, a system user), so it runs only as root
# with WEIGHTD_TEST_DPKG_INSTALL=1, or in CI (CI=true, a throwaway machine), and only when no
# weightd package is installed already; otherwise it exits 77, which ctest reports as skipped.
# test_deb.sh checks the same package unpacked (dpkg-deb -x) wherever it runs.
# Usage: test_deb_install.sh BUILD_DIR CHECKPOINT_WRITER PYTHON
set -euo pipefail
build=$(cd "$1" && pwd)
make_ckpt=$2
python=$3
if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: installing a package needs root"; exit 77
fi
if [[ ${WEIGHTD_TEST_DPKG_INSTALL:-} != 1 && ${CI:-} != true ]]; then
  echo "SKIP: installs system-wide; set WEIGHTD_TEST_DPKG_INSTALL=1 (CI=true does) to run it"
  exit 77
fi
if dpkg-query -W -f='${Status}' weightd 2>/dev/null | grep -q "installed"; then
  echo "SKIP: a weightd package is installed on this machine already"; exit 77
fi
work=$(mktemp -d /tmp/weightd-deb-install-XXXXXX)
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  dpkg --purge weightd >/dev/null 2>&1 || true
  rm -f /etc/weightd/operator-notes.txt
  rmdir /etc/weightd 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

deb=$(bash "$(dirname "$0")/build_deb.sh" "$build" "$work/pkg")
files=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | sed 's|^\./|/|')
dpkg -i "$deb" || fail "dpkg -i"
for f in $files; do [[ -e $f || -L $f ]] || fail "dpkg -i did not install $f"; done
getent passwd weightd >/dev/null || fail "postinst did not create the weightd user"
getent group weightd >/dev/null || fail "postinst did not create the weightd group"
out=$(systemd-analyze verify --man=no /usr/lib/systemd/system/weightd.socket \
      /usr/lib/systemd/system/weightd.service 2>&1) || fail "systemd-analyze verify: $out"
[[ -z $out ]] || fail "systemd-analyze verify: $out"
weightctl --version | grep -q '^weightctl ' || fail "weightctl is not on PATH"
man -w weightd >/dev/null 2>&1 || [[ -f /usr/share/man/man8/weightd.8.gz ]] || fail "man page"

"$python" "$make_ckpt" "$work/ckpt" >/dev/null
sock=$work/s
/usr/bin/weightd --socket "$sock" --backend host 2>"$work/weightd.log" &
daemon=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done
[[ -S $sock ]] || fail "the installed weightd did not listen: $(cat "$work/weightd.log")"
/usr/bin/weightctl --socket "$sock" load tiny "$work/ckpt" --wait >/dev/null || fail "load"
/usr/bin/weightctl --socket "$sock" attach tiny --rank 0 --verify >/dev/null || fail "attach"
kill "$daemon"; wait "$daemon" || fail "weightd did not stop cleanly"
daemon=""

echo "an operator's file" >/etc/weightd/operator-notes.txt
dpkg -r weightd || fail "dpkg -r"
for f in $files; do
  [[ $f == /etc/weightd/weightd.json ]] && continue
  [[ ! -e $f && ! -L $f ]] || fail "dpkg -r left $f"
done
[[ -f /etc/weightd/weightd.json ]] || fail "dpkg -r removed the conffile"
dpkg --purge weightd || fail "dpkg --purge"
[[ ! -e /etc/weightd/weightd.json ]] || fail "purge left the conffile"
[[ -f /etc/weightd/operator-notes.txt ]] || fail "purge removed a file the package did not create"
! getent passwd weightd >/dev/null || fail "purge left the weightd user"
! getent group weightd >/dev/null || fail "purge left the weightd group"
echo "dpkg -i / -r / --purge checks passed"

#!/usr/bin/env bash
# Run a command in a test lane.
#
#   images/lane.sh svm -- CMD [ARGS...]   inside the SVM lane: an L1 Linux VM on QEMU TCG's
#                                         emulated AMD-V, where /dev/kvm is kvm_amd with nested
#                                         paging (the hardware-KVM code path)
#   images/lane.sh pvm -- CMD [ARGS...]   directly on this machine (its /dev/kvm, whatever it is)
#   images/lane.sh auto -- CMD [ARGS...]  the lane named by $LUCOS_LANE (svm or pvm; default: direct)
#   images/lane.sh CMD [ARGS...]          directly, as 'pvm'
#
# In the SVM lane the command runs as root, chrooted into the host's root file system
# (shared read-only over virtio-9p, so every host path, binary and library is there), with
# the checkout writable at its own path, fresh /tmp, /dev (with /dev/kvm), /proc, /sys, the
# caller's environment and working directory. Its stdout and stderr are streamed back, and
# its exit status is returned. Stdin is not forwarded. L1 is built by images/build.sh
# (images/lane/build-image.sh; cached under ~/.cache/lucos).
#
# Exit status: the command's; 125 when the lane could not run it (L1 failed; its console
# is printed; also when L1 stopped responding, see LUCOS_LANE_STALL), 124 when
# LUCOS_LANE_TIMEOUT expired, 2 for a usage error.
#
# Environment:
#   LUCOS_LANE_TIMEOUT  seconds before L1 is stopped (default 3600)
#   LUCOS_LANE_STALL    seconds without L1's heartbeat before L1 is taken as wedged and
#                       stopped (default 240; exit status 125)
#   LUCOS_LANE_WEDGE_RETRIES  times to run the command again in a fresh L1 after such a
#                       wedge (default 0; .ci/run sets 1). Only a stopped heartbeat counts:
#                       a command that fails or hangs is never run again.
#   LUCOS_LANE_MEM      L1 memory (default 4G)
#   LUCOS_LANE_SMP      L1 vCPUs (default 1: one TCG thread, so no cross-CPU code
#                       modification races; 2 runs L2's vCPUs in parallel, ~1.4x faster,
#                       and now and then breaks L1 or an L2 guest, see README "Lanes")
#   LUCOS_LANE_CPU      QEMU -cpu for L1 (default: max without XSAVE/AVX, see below)
#   LUCOS_LANE_TCG_THREAD  multi (default: one host thread per L1 vCPU) or single (one
#                       thread for all L1 vCPUs: with 2, about 3x slower)
#   LUCOS_LANE_RW       extra writable host paths, colon separated (the checkout always is)
#   LUCOS_LANE_VERBOSE  1: copy L1's console to stderr as it runs
#   LUCOS_LANE_HOLD     0: do not keep an idle VM open in L1 (see images/lane/kvm-hold.c)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "lane.sh: $*" >&2; exit "${2:-2}"; }

lane=direct
case "${1:-}" in
    -h|--help|"") usage; [ -n "${1:-}" ]; exit $? ;;
    svm|pvm) lane=$1; shift ;;
    auto) shift; lane=${LUCOS_LANE:-direct} ;;
esac
[ "${1:-}" = -- ] && shift
(($#)) || die "no command given (try --help)"
# Inside the lane every command runs directly.
[ -n "${LUCOS_LANE_INSIDE:-}" ] && lane=direct
case "$lane" in
    direct|pvm|"") exec "$@" ;;
    svm) ;;
    *) die "unknown lane '$lane': expected svm or pvm" ;;
esac

command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found: install it (apt-get install qemu-system-x86), then run images/build.sh" 125
img="$root/images/out/lane-svm"
[ -f "$img/.done" ] && [ -f "$img/vmlinuz" ] && [ -f "$img/initramfs.cpio" ] ||
    die "SVM lane image not found at $img: build it with images/build.sh (or images/lane/build-image.sh)" 125

run=$(mktemp -d "${TMPDIR:-/tmp}/lucos-lane.XXXXXX") || die "mktemp failed" 125
trap 'rm -rf "$run"' EXIT
{
    export -p | grep -v -E '^declare -x (LUCOS_LANE|OLDPWD|PWD|SHLVL|_)='
    echo "export LUCOS_LANE_INSIDE=svm"
    printf 'cd -- %q || exit 125\n' "$PWD"
    printf 'exec'; printf ' %q' "$@"; printf '\n'
} > "$run/run.sh"

virtfs=(-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        -virtfs "local,path=$run,mount_tag=lanerun,security_model=none")
n=0
IFS=: read -r -a rw <<< "$root${LUCOS_LANE_RW:+:$LUCOS_LANE_RW}"
: > "$run/mounts"
for p in "${rw[@]}"; do
    [ -n "$p" ] || continue
    p=$(readlink -f "$p")
    [ -d "$p" ] || die "LUCOS_LANE_RW: $p is not a folder"
    case "$p" in *[[:space:]]*) die "LUCOS_LANE_RW: paths with spaces are not supported: '$p'" ;; esac
    virtfs+=(-virtfs "local,path=$p,mount_tag=rw$n,security_model=none,multidevs=remap")
    echo "rw$n $p" >> "$run/mounts"
    n=$((n + 1))
done
case "$run" in *[[:space:]]*) die "TMPDIR with spaces is not supported: '$run'" ;; esac

console="$run/console.log"
verbose=${LUCOS_LANE_VERBOSE:-0}
if [ "$verbose" = 1 ]; then
    : > "$console"
    tail -n +1 -f "$console" >&2 & tailpid=$!
    trap 'kill $tailpid 2>/dev/null; rm -rf "$run"' EXIT
fi
# The command's output reaches our stdout/stderr through FIFOs and cat, which write through
# our own file descriptors (QEMU opening /dev/fd/1 itself would get its own file offset when
# stdout is a regular file, and the two writers would overwrite each other).
mkfifo "$run/out" "$run/err" || die "mkfifo in $run failed" 125
cat "$run/out" & catout=$!
cat "$run/err" >&2 & caterr=$!
# The L1 CPU: QEMU's "max" without XSAVE and what builds on it. QEMU 7.2's TCG does not
# deliver the XSETBV intercept to L1's kvm_amd (measured: 0 XSETBV exits while the L2
# kernel set XCR0), so L2 would write L1's XCR0 behind KVM's back, and its kernel then
# finds CPUID's XSAVE size inconsistent ("XSAVE consistency problem", a WARN) and falls
# back to FXSAVE. Without XSAVE in L1, KVM offers none to L2 and the guest is consistent.
cpu=${LUCOS_LANE_CPU:-max,-xsave,-avx,-avx2,-fma,-f16c,-vaes,-vpclmulqdq}
# qboot (QEMU's minimal firmware) boots L1 about 2 s sooner than SeaBIOS.
bios=(); [ -f /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
t0=$(date +%s.%N)
timeout -k 10 "${LUCOS_LANE_TIMEOUT:-3600}" qemu-system-x86_64 \
    -accel "tcg,thread=${LUCOS_LANE_TCG_THREAD:-multi}" -M pc -cpu "$cpu" -smp "${LUCOS_LANE_SMP:-1}" -m "${LUCOS_LANE_MEM:-4G}" \
    -nodefaults -display none -no-reboot "${bios[@]}" \
    -kernel "$img/vmlinuz" -initrd "$img/initramfs.cpio" \
    -append "console=ttyS0 panic=1 quiet loglevel=4 lane.run=$run lane.hold=${LUCOS_LANE_HOLD:-1}" \
    -chardev "file,id=l1console,path=$console,append=on" -serial chardev:l1console \
    -device virtio-serial-pci,id=vser \
    -chardev "file,id=cmdout,path=$run/out" -device virtserialport,bus=vser.0,chardev=cmdout,name=lane.out \
    -chardev "file,id=cmderr,path=$run/err" -device virtserialport,bus=vser.0,chardev=cmderr,name=lane.err \
    -chardev "file,id=beat,path=$run/beat" -device virtserialport,bus=vser.0,chardev=beat,name=lane.beat \
    "${virtfs[@]}" </dev/null &
qpid=$!
# The stall watchdog: L1 writes a heartbeat every 10 s (images/lane/init); when none has
# come for LUCOS_LANE_STALL seconds, L1 is wedged (QEMU-TCG, see README "Lanes") and is
# stopped now rather than at LUCOS_LANE_TIMEOUT.
stall=${LUCOS_LANE_STALL:-240}
(
    last=-1 quiet=0
    while kill -0 "$qpid" 2>/dev/null; do
        sleep 5
        size=$(stat -c %s "$run/beat" 2>/dev/null || echo 0)
        if [ "$size" != "$last" ]; then last=$size quiet=0; else quiet=$((quiet + 5)); fi
        if [ "$quiet" -ge "$stall" ]; then
            echo "$(tail -n 1 "$run/beat" 2>/dev/null)" > "$run/stalled"
            kill -TERM "$qpid" 2>/dev/null
            break
        fi
    done
) & wdpid=$!
wait "$qpid"
qrc=$?
kill "$wdpid" 2>/dev/null
wait "$wdpid" 2>/dev/null
# If QEMU failed before opening the FIFOs, the cats still wait for a writer: be one, briefly
# (O_RDWR never blocks on a FIFO).
for f in out err; do exec 3<>"$run/$f"; exec 3>&-; done
wait "$catout" "$caterr"
[ "$verbose" = 1 ] && { sleep 0.2; kill "$tailpid" 2>/dev/null; }
secs=$(echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}')
if [ -f "$run/status" ]; then
    rc=$(cat "$run/status")
    [ "$verbose" = 1 ] && echo "lane.sh: svm: exit status $rc after ${secs}s" >&2
    exit "$rc"
fi
if [ -f "$run/stalled" ]; then
    echo "lane.sh: svm: L1 stopped responding: no heartbeat for ${stall}s (LUCOS_LANE_STALL; last at L1 uptime $(cat "$run/stalled")s), stopped after ${secs}s; L1 console:" >&2
    [ -f "$console" ] && tail -n 40 "$console" >&2
    retries=${LUCOS_LANE_WEDGE_RETRIES:-0}
    if [ "$retries" -gt 0 ]; then
        # L1 itself stopped (not the command: a command that hangs keeps the heartbeat
        # going), so its run says nothing about the command; run it again in a fresh L1.
        echo "lane.sh: NOTE: L1 wedged; running the command again in a fresh L1 ($retries retries left)" >&2
        [ "$verbose" = 1 ] && kill "$tailpid" 2>/dev/null
        rm -rf "$run"
        LUCOS_LANE_WEDGE_RETRIES=$((retries - 1)) exec "${BASH_SOURCE[0]}" svm -- "$@"
    fi
    exit 125
fi
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
    echo "lane.sh: svm: stopped after ${LUCOS_LANE_TIMEOUT:-3600}s (LUCOS_LANE_TIMEOUT); L1 console:" >&2
    [ -f "$console" ] && tail -n 40 "$console" >&2; exit 124
fi
echo "lane.sh: svm: L1 ended without running the command (qemu exit $qrc after ${secs}s); L1 console:" >&2
[ -f "$console" ] && tail -n 40 "$console" >&2
exit 125

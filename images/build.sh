#!/usr/bin/env bash
# Build the lucos guest images: an uncompressed vmlinux (Linux 6.1 from Debian's
# linux-source-6.1, small config from images/guest.config), its kernel build tree
# (for building patch modules), and a busybox initramfs.
#
# Output: images/out/ (ignored), a symlink farm into the cache:
#   images/out/vmlinux          uncompressed ELF kernel, with .BTF and symbols
#   images/out/build/           kernel build tree (O=), use with `make -C ... M=`
#   images/out/src/             kernel source tree
#   images/out/initramfs.cpio   busybox initramfs (newc, uncompressed), with the guest programs
#                               of images/initramfs/progs and, for bench/'s livepatch-compare,
#                               the Linux livepatch modules livepatch-sample.ko (the kernel's
#                               sample) and livepatch-uname.ko (images/livepatch/) in /lucos/,
#                               and the kernel's modules in /lib/modules/VERSION (modprobe)
#   images/out/stable-fixes/    live patches built with lucos-build from images/stable-fixes/
#   images/out/module-patches/  live patches to guest modules, from images/module-patches/
#   images/out/lane-svm/        the SVM lane's L1 kernel + initramfs (images/lane/build-image.sh;
#                               run commands there with images/lane.sh svm -- CMD)
#
# Cache: ${LUCOS_CACHE:-$HOME/.cache/lucos}/kernel-<hash>, keyed by the hash of the
# config fragment, the build recipe, the kernel patches and the linux-source package
# version. A second run with nothing changed is instant.
#
# Usage: images/build.sh [--boot] [--no-install]
#   --boot        after building, boot the guest under lucos-vmm (interactive shell)
#   --no-install  do not apt-get install missing build dependencies
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cache="${LUCOS_CACHE:-$HOME/.cache/lucos}"
out="$here/out"
boot=0
install=1
for arg in "$@"; do
    case "$arg" in
        --boot) boot=1 ;;
        --no-install) install=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[images %(%H:%M:%S)T] %s\n' -1 "$*"; }
t_start=$(date +%s)

deps=(linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev dwarves cpio
      busybox-static xz-utils python3 file qemu-system-x86 kmod fonts-dejavu-core)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if ((install)); then
        log "installing build dependencies: ${missing[*]}"
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "build.sh: missing packages: ${missing[*]}" >&2; exit 1
    fi
fi

src_tar=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
[ -n "$src_tar" ] || { echo "build.sh: /usr/src/linux-source-6.1.tar.* not found" >&2; exit 1; }
src_ver=$(dpkg-query -W -f='${Version}' linux-source-6.1)

# Everything that determines the kernel goes into the key.
# Bump recipe when the kernel build steps below change.
recipe=1
patches() { [ -d "$here/kernel-patches" ] && find "$here/kernel-patches" -type f -name '*.patch' | sort; true; }
key=$( { echo "recipe=$recipe src=$src_ver"; cat "$here/guest.config"; patches | xargs -r cat; } \
       | sha256sum | cut -c1-16)
kdir="$cache/kernel-$key"
mkdir -p "$cache"

if [ -f "$kdir/.done" ]; then
    log "kernel cached: $kdir (linux-source $src_ver)"
else
    log "building kernel $key from linux-source $src_ver into $kdir"
    rm -rf "$kdir"; mkdir -p "$kdir/build"
    log "extracting $src_tar"
    tar -C "$kdir" -xf "$src_tar"
    mv "$kdir"/linux-source-6.1 "$kdir/src"
    for p in $(patches); do
        log "applying $(basename "$p")"
        patch -d "$kdir/src" -p1 --forward --quiet < "$p"
    done
    cd "$kdir/src"
    make -s O="$kdir/build" ARCH=x86_64 tinyconfig >"$kdir/config.log" 2>&1
    "$kdir/src/scripts/kconfig/merge_config.sh" -m -O "$kdir/build" "$kdir/build/.config" "$here/guest.config" >/dev/null
    make -s O="$kdir/build" ARCH=x86_64 olddefconfig >>"$kdir/config.log" 2>&1
    # Verify every requested option stuck.
    bad=0
    while IFS= read -r line; do
        case "$line" in ''|'#'*) continue ;; esac
        opt=${line%%=*}; val=${line#*=}
        if [ "$val" = n ]; then
            grep -qx "# $opt is not set" "$kdir/build/.config" || ! grep -q "^$opt=" "$kdir/build/.config" || { echo "  $opt should be off" >&2; bad=1; }
        else
            grep -qx "$opt=$val" "$kdir/build/.config" || { echo "  $opt=$val did not stick" >&2; bad=1; }
        fi
    done < "$here/guest.config"
    ((bad == 0)) || { echo "build.sh: kernel config is missing required options (above)" >&2; exit 1; }
    log "compiling (make -j$(nproc) vmlinux modules); this takes a while on a fresh machine"
    t_k=$(date +%s)
    make -s O="$kdir/build" ARCH=x86_64 -j"$(nproc)" vmlinux modules 2>&1 | grep -v '^\s*$' || true
    [ -f "$kdir/build/vmlinux" ] || { echo "build.sh: kernel build failed" >&2; exit 1; }
    log "kernel built in $(( $(date +%s) - t_k ))s"
    touch "$kdir/.done"
    cd "$root"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage="$tmp/initramfs"

# Modules built against the guest kernel, before the initramfs that carries some of them.
# The patch modules in guest-patches/ (tests use them as built here when they are newer
# than their sources).
log "building guest-patches/ against the guest kernel"
if ! make -s -C "$root/guest-patches" KDIR="$kdir/build" > "$tmp/patches.log" 2>&1; then
    cat "$tmp/patches.log" >&2; echo "build.sh: building guest-patches/ failed" >&2; exit 1
fi
# Linux livepatch modules for bench/'s livepatch-compare: the kernel's own sample
# (samples/livepatch, built with the kernel: CONFIG_SAMPLE_LIVEPATCH=m) and images/livepatch/.
log "building images/livepatch/ against the guest kernel"
if ! make -s -C "$here/livepatch" KDIR="$kdir/build" > "$tmp/livepatch.log" 2>&1; then
    cat "$tmp/livepatch.log" >&2; echo "build.sh: building images/livepatch/ failed" >&2; exit 1
fi
klp_modules=("$kdir/build/samples/livepatch/livepatch-sample.ko" "$here/livepatch/livepatch-uname.ko")
for ko in "${klp_modules[@]}"; do
    [ -f "$ko" ] || { echo "build.sh: $ko was not built" >&2; exit 1; }
done

# Real upstream stable fixes (images/stable-fixes/*.patch, each reverted in the image by
# images/kernel-patches/) built into live patches from their diffs with lucos-build: the
# tests apply them (vmm/tests/stable_fixes.rs). Rebuilt when the diff or the tool changes.
log "building images/stable-fixes/ with lucos-build"
(cd "$root" && cargo build --release -q -p lucos-build)
lucos_build="${CARGO_TARGET_DIR:-$root/target}/release/lucos-build"
mkdir -p "$out/stable-fixes"
for p in "$here"/stable-fixes/*.patch; do
    [ -e "$p" ] || continue
    n=$(basename "$p" .patch)
    ko="$out/stable-fixes/$n.ko"
    if [ "$ko" -nt "$p" ] && [ "$ko" -nt "$lucos_build" ] && [ "$ko" -nt "$kdir/.done" ]; then continue; fi
    if ! "$lucos_build" --patch "$p" --name "${n//-/_}" --src "$kdir/src" --build "$kdir/build" -o "$ko" > "$tmp/$n.log" 2>&1; then
        cat "$tmp/$n.log" >&2; echo "build.sh: lucos-build failed for $p" >&2; exit 1
    fi
done

# Live patches to guest modules (images/module-patches/*.patch, diffs against a module's
# source such as fs/xfs/), built with lucos-build like the stable fixes: the tests load the
# module in the guest and apply them (vmm/tests/patch_kmod.rs).
log "building images/module-patches/ with lucos-build"
mkdir -p "$out/module-patches"
for p in "$here"/module-patches/*.patch; do
    [ -e "$p" ] || continue
    n=$(basename "$p" .patch)
    ko="$out/module-patches/$n.ko"
    if [ "$ko" -nt "$p" ] && [ "$ko" -nt "$lucos_build" ] && [ "$ko" -nt "$kdir/.done" ]; then continue; fi
    if ! "$lucos_build" --patch "$p" --name "${n//-/_}" --src "$kdir/src" --build "$kdir/build" -o "$ko" > "$tmp/$n.log" 2>&1; then
        cat "$tmp/$n.log" >&2; echo "build.sh: lucos-build failed for $p" >&2; exit 1
    fi
done

# Initramfs: cheap, rebuilt every time from images/initramfs/.
log "building initramfs"
mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,etc,root,usr/bin,usr/sbin,lucos}
cp /bin/busybox "$stage/bin/busybox"
cp "$here/initramfs/init" "$stage/init"
chmod 0755 "$stage/init"
if [ -d "$here/initramfs/lucos" ]; then cp -a "$here/initramfs/lucos/." "$stage/lucos/"; fi
# Guest test programs: freestanding C (raw syscalls, no libc), static.
for src in "$here"/initramfs/progs/*.c; do
    [ -e "$src" ] || continue
    gcc -static -nostdlib -nostartfiles -ffreestanding -fno-stack-protector -fno-builtin -O2 \
        -o "$stage/lucos/$(basename "$src" .c)" "$src"
done
# The guest kernel's own modules (xfs, joydev, pcspkr, usbcore and what they need),
# stripped, in /lib/modules/VERSION with depmod's index: `modprobe xfs` works in the guest,
# and the kernel's own module requests (/sbin/modprobe) too. Left out: the livepatch
# samples (/lucos/ has the ones the benches use) and kvm (2.3 MB, no use in the guest).
kver=$(cat "$kdir/build/include/config/kernel.release")
make -s -C "$kdir/build" ARCH=x86_64 INSTALL_MOD_PATH="$stage" INSTALL_MOD_STRIP=1 DEPMOD=true modules_install
kmods="$stage/lib/modules/$kver"
rm -rf "$kmods/kernel/samples" "$kmods/kernel/arch/x86/kvm" "$kmods/kernel/virt" "$kmods/build" "$kmods/source"
depmod -b "$stage" "$kver"
ln -sf /bin/busybox "$stage/sbin/modprobe"
# Livepatch modules, loadable in the guest as they are: /lucos/livepatch-*.ko.
for ko in "${klp_modules[@]}"; do
    strip --strip-debug -o "$stage/lucos/$(basename "$ko")" "$ko"
done
# lucosctl for the guest (/bin/lucosctl, talks to the VMM over AF_VSOCK with --vsock): a
# static glibc build, as no musl target is assumed to be installed.
log "building static lucosctl"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
(cd "$root" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -q \
    -p lucos-update-server --bin lucosctl --target x86_64-unknown-linux-gnu)
lucosctl="$target_dir/x86_64-unknown-linux-gnu/release/lucosctl"
if ! file -L "$lucosctl" | grep -Eq 'statically linked|static-pie linked'; then
    echo "build.sh: $lucosctl is not statically linked: $(file -L "$lucosctl")" >&2; exit 1
fi
strip -o "$stage/bin/lucosctl" "$lucosctl"
# Extra files can be dropped in by callers via LUCOS_INITRAMFS_EXTRA.
if [ -n "${LUCOS_INITRAMFS_EXTRA:-}" ] && [ -d "$LUCOS_INITRAMFS_EXTRA" ]; then
    cp -a "$LUCOS_INITRAMFS_EXTRA/." "$stage/"
fi
mkdir -p "$out"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) > "$out/initramfs.cpio.tmp"
mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"

"$here/lane/build-image.sh"

ln -sfn "$kdir/build/vmlinux" "$out/vmlinux"
ln -sfn "$kdir/build" "$out/build"
ln -sfn "$kdir/src" "$out/src"
kver=$(cat "$kdir/build/include/config/kernel.release" 2>/dev/null || echo '?')
log "done in $(( $(date +%s) - t_start ))s: kernel $kver"
log "  $out/vmlinux -> $kdir/build/vmlinux"
log "  $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes)"

if ((boot)); then
    log "booting the guest under lucos-vmm (type 'reboot -f' in the guest to exit)"
    cd "$root"
    cargo build --release -q -p lucos-vmm
    exec "$root/target/release/lucos-vmm" run --kernel "$out/vmlinux" --initrd "$out/initramfs.cpio" --vcpus 2 --mem 512M
fi

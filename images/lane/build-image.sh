#!/usr/bin/env bash
# Build the SVM lane's L1 image (cached): a Debian 6.1 kernel downloaded with apt, and a
# busybox initramfs with kvm_amd and the virtio-9p modules from that package, the lane's
# init (images/lane/init) and kvm-hold.
#
# Why Debian's generic kernel (linux-image-amd64) and not its cloud kernel: the cloud
# kernel has no 9p, and the lane shares the host's file system with L1 over virtio-9p
# (QEMU's built-in virtfs, no host daemon). Both have kvm/kvm-amd as modules.
#
# Output: $cache/lane-svm-<key>/{vmlinuz,initramfs.cpio,kernel-version}, and the symlink
# images/out/lane-svm to it. The key hashes the kernel package version and the lane files.
#
# Usage: images/lane/build-image.sh   (called by images/build.sh; env LUCOS_CACHE, LUCOS_LANE_KPKG)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
images="$(dirname "$here")"
cache="${LUCOS_CACHE:-$HOME/.cache/lucos}"
log() { printf '[lane %(%H:%M:%S)T] %s\n' -1 "$*"; }

meta=linux-image-amd64
kpkg="${LUCOS_LANE_KPKG:-$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}"
if [ -z "$kpkg" ]; then
    log "apt lists have no $meta: apt-get update"
    apt-get update -qq
    kpkg=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "lane: cannot find the kernel package behind $meta" >&2; exit 1; }
kpkg_ver=$(apt-cache policy "$kpkg" | awk '/Candidate:/ {print $2}')

recipe=1
key=$( { echo "recipe=$recipe pkg=$kpkg ver=$kpkg_ver"; cat "$here/init" "$here/kvm-hold.c" "${BASH_SOURCE[0]}"; } \
       | sha256sum | cut -c1-16)
dir="$cache/lane-svm-$key"
mkdir -p "$images/out"
if [ -f "$dir/.done" ]; then
    log "SVM lane image cached: $dir ($kpkg $kpkg_ver)"
    ln -sfn "$dir" "$images/out/lane-svm"
    exit 0
fi

log "building the SVM lane image from $kpkg $kpkg_ver into $dir"
for tool in qemu-system-x86_64 busybox depmod cpio gcc; do
    command -v "$tool" >/dev/null || { echo "lane: '$tool' not found (images/build.sh installs it)" >&2; exit 1; }
done
rm -rf "$dir"; mkdir -p "$dir"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "$kpkg=$kpkg_ver" >/dev/null 2>&1) || (cd "$work" && apt-get download "$kpkg=$kpkg_ver")
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/pkg"
kver=$(ls "$work/pkg/lib/modules")
depmod -b "$work/pkg" "$kver"
cp "$work/pkg/boot/vmlinuz-$kver" "$dir/vmlinuz"
echo "$kver" > "$dir/kernel-version"

stage="$work/stage"
mkdir -p "$stage"/{bin,sbin,proc,sys,dev,tmp,host,lib/modules}
cp /bin/busybox "$stage/bin/busybox"
cp "$here/init" "$stage/init"; chmod 0755 "$stage/init"
gcc -static -O2 -Wall -o "$stage/bin/kvm-hold" "$here/kvm-hold.c"
# The modules the lane needs and their dependencies, in load order.
python3 - "$work/pkg/lib/modules/$kver" "$stage/lib/modules" kvm-amd 9pnet_virtio 9p virtio_pci virtio_console <<'PY'
import os, shutil, sys
mdir, dest, wanted = sys.argv[1], sys.argv[2], sys.argv[3:]
deps = {}
for line in open(os.path.join(mdir, "modules.dep")):
    path, _, rest = line.partition(":")
    deps[path] = rest.split()
by_name = {os.path.basename(p)[:-3].replace("-", "_"): p for p in deps}
order = []
def visit(path):
    if path in order:
        return
    for d in deps[path]:
        visit(d)
    order.append(path)
for w in wanted:
    p = by_name.get(w.replace("-", "_"))
    if p is None:
        sys.exit(f"lane: module {w} not in the kernel package")
    visit(p)
with open(os.path.join(dest, "order"), "w") as f:
    for p in order:
        shutil.copy(os.path.join(mdir, p), os.path.join(dest, os.path.basename(p)))
        f.write(os.path.basename(p) + "\n")
print("lane: modules:", " ".join(os.path.basename(p)[:-3] for p in order))
PY
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) > "$dir/initramfs.cpio"
touch "$dir/.done"
ln -sfn "$dir" "$images/out/lane-svm"
log "done: $dir (kernel $kver, initramfs $(stat -c %s "$dir/initramfs.cpio") bytes)"

#!/usr/bin/env bash
# build-rootfs.sh makes a minimal busybox root filesystem in DIR from Debian's
# busybox-static: /bin/busybox, a relative symlink per applet, /etc/passwd and
# /etc/group, and the mount points an OCI runtime expects.
set -euo pipefail
dir=${1:?usage: build-rootfs.sh DIR}
bb=/bin/busybox
if [[ ! -x $bb || $(ldd "$bb" 2>&1 || true) != *"not a dynamic"* ]]; then
	echo "build-rootfs: a static $bb is needed: run make setup (busybox-static)" >&2
	exit 1
fi
tmp=$dir.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,etc,proc,sys,dev,tmp,root,run,var/tmp}
chmod 1777 "$tmp/tmp" "$tmp/var/tmp"
cp "$bb" "$tmp/bin/busybox"
for applet in $("$bb" --list); do
	[[ $applet == busybox ]] || ln -sf busybox "$tmp/bin/$applet"
done
cat >"$tmp/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$tmp/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
rm -rf "$dir"
mv "$tmp" "$dir"
echo "build-rootfs: $dir"

#!/bin/sh
# Build a small OCI image layout of Debian's busybox-static with umoci: examples/busybox-image.sh DIR [TAG]
# The image has a busybox userland, /etc/passwd with root, nobody and a user "app" (uid 1000, member of
# group "extra"), and runs `sh` by default. Commands are echoed so they can be repeated by hand.
set -eu
dir=$1
tag=${2:-latest}
# Reproducible: the same busybox gives the same image digest (so a rebuilt demo image is the one already imported
# and signed); every timestamp is SOURCE_DATE_EPOCH, by default the mtime of the busybox binary.
epoch=${SOURCE_DATE_EPOCH:-$(stat -c %Y /bin/busybox)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT
run() { echo "+ $*" >&2; "$@"; }
rm -rf "$dir"
run umoci init --layout "$dir"
run umoci new --image "$dir:$tag"
run umoci unpack --image "$dir:$tag" "$bundle/b"
root=$bundle/b/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/home/app" "$root/root"
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\napp:x:1000:\nextra:x:1001:app\nnogroup:x:65534:\n' > "$root/etc/group"
chown 1000:1000 "$root/home/app"
find "$root" -exec touch -h -d "@$epoch" {} +
echo "+ cp /bin/busybox (and its applet links, /etc/passwd, /etc/group) into the bundle, all dated $created" >&2
run umoci repack --image "$dir:$tag" --history.created "$created" "$bundle/b"
run umoci config --image "$dir:$tag" --created "$created" --history.created "$created" --config.cmd sh \
  --config.env PATH=/bin --config.workingdir /

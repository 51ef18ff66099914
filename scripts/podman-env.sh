#!/bin/bash
# Prepare a rootless Podman test environment for the end-to-end tests (tests/e2e_podman.rs)
# and the start-up benchmark (bench/podman-start.sh). Idempotent; run as root.
#
# What it sets up, and why (see docs/testing-e2e.md):
#   - an unprivileged user (default `shieldtest`) with subordinate UID/GID ranges, which
#     rootless Podman needs to build a user namespace;
#   - /run/user/UID owned by that user (mode 700), its XDG_RUNTIME_DIR, since there is no
#     systemd-logind session to create it;
#   - ~USER/.config/containers/containers.conf with this machine's quirks (runc instead of
#     crun, cgroupfs, file events, explicit ulimits). These are test-setup settings only;
#     the product never writes them;
#   - /dev/net/tun usable by the user (slirp4netns opens it);
#   - an offline image `localhost/shield-test:latest`: a static busybox and its applet
#     links, imported from a tarball (no registry needed).
#
# Packages (installed by CI before this script runs):
#   apt-get install -y podman runc slirp4netns uidmap busybox-static nftables iproute2 time
#
# Environment: E2E_USER (default shieldtest), E2E_IMAGE (default localhost/shield-test:latest).
set -euo pipefail

E2E_USER=${E2E_USER:-shieldtest}
E2E_IMAGE=${E2E_IMAGE:-localhost/shield-test:latest}
# Bump when the image recipe changes: an image with another recipe label is rebuilt.
IMAGE_RECIPE=2

say() { printf 'podman-env: %s\n' "$*"; }
die() { printf 'podman-env: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it creates a user and edits /etc/subuid)"

# --- tools ---------------------------------------------------------------------------------
missing=()
for tool in podman runc slirp4netns newuidmap newgidmap nft ip runuser useradd; do
    command -v "$tool" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
BUSYBOX=""
for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && ! (ldd "$b" >/dev/null 2>&1); then BUSYBOX=$b; break; fi
done
[ -n "$BUSYBOX" ] || missing+=("static busybox (busybox-static)")
if [ ${#missing[@]} -gt 0 ]; then
    die "missing: ${missing[*]}; install with: apt-get install -y podman runc slirp4netns uidmap busybox-static nftables iproute2"
fi
say "tools present: $(podman --version), runc $(runc --version | head -1 | awk '{print $3}'), $($BUSYBOX | head -1 | awk '{print $1, $2}')"

# --- user ----------------------------------------------------------------------------------
if id -u "$E2E_USER" >/dev/null 2>&1; then
    say "user $E2E_USER exists (uid $(id -u "$E2E_USER"))"
else
    if ! getent passwd 1001 >/dev/null; then
        useradd --create-home --shell /bin/bash --uid 1001 "$E2E_USER"
    else
        useradd --create-home --shell /bin/bash "$E2E_USER"
    fi
    say "created user $E2E_USER (uid $(id -u "$E2E_USER"))"
fi
E2E_UID=$(id -u "$E2E_USER")
E2E_GID=$(id -g "$E2E_USER")
E2E_HOME=$(getent passwd "$E2E_USER" | cut -d: -f6)
[ -d "$E2E_HOME" ] || { mkdir -p "$E2E_HOME"; chown "$E2E_UID:$E2E_GID" "$E2E_HOME"; say "created $E2E_HOME"; }

# --- subordinate ids -----------------------------------------------------------------------
# A range of 65536 ids that overlaps no other entry (start at 100000 or after the last one).
ensure_subids() {
    local file=$1
    touch "$file"
    if grep -q "^${E2E_USER}:" "$file" || grep -q "^${E2E_UID}:" "$file"; then
        say "$file: $(grep -E "^(${E2E_USER}|${E2E_UID}):" "$file" | head -1)"
        return
    fi
    local start
    start=$(awk -F: 'BEGIN { m = 100000 } NF == 3 { e = $2 + $3; if (e > m) m = e } END { print m }' "$file")
    echo "${E2E_USER}:${start}:65536" >>"$file"
    say "$file: added ${E2E_USER}:${start}:65536"
}
ensure_subids /etc/subuid
ensure_subids /etc/subgid

# Unprivileged user namespaces (Debian kernels have a switch for them).
if [ -r /proc/sys/kernel/unprivileged_userns_clone ] && [ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" = 0 ]; then
    echo 1 >/proc/sys/kernel/unprivileged_userns_clone
    say "enabled kernel.unprivileged_userns_clone"
fi

# --- runtime directory ---------------------------------------------------------------------
RUNTIME_DIR=/run/user/$E2E_UID
mkdir -p /run/user
chmod 755 /run/user
mkdir -p "$RUNTIME_DIR"
chown "$E2E_UID:$E2E_GID" "$RUNTIME_DIR"
chmod 700 "$RUNTIME_DIR"
say "runtime dir $RUNTIME_DIR (owner $E2E_USER, mode 700)"

# --- containers.conf -----------------------------------------------------------------------
CONF_DIR=$E2E_HOME/.config/containers
CONF=$CONF_DIR/containers.conf
WANT_CONF='# Written by scripts/podman-env.sh: quirks of the test machine, not product settings.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
'
for d in "$E2E_HOME/.config" "$CONF_DIR"; do
    [ -d "$d" ] || { mkdir -p "$d"; chown "$E2E_UID:$E2E_GID" "$d"; }
done
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$(printf '%s' "$WANT_CONF")" ]; then
    say "$CONF is up to date"
else
    [ -f "$CONF" ] && cp -p "$CONF" "$CONF.before-podman-env" && say "previous $CONF saved as $CONF.before-podman-env"
    printf '%s' "$WANT_CONF" >"$CONF"
    chown "$E2E_UID:$E2E_GID" "$CONF"
    chmod 644 "$CONF"
    say "wrote $CONF (runtime runc, cgroupfs, file events, ulimits)"
fi

# --- containers.conf for root (tests/e2e_rootful.rs) --------------------------------------
# Rootful podman reads only the system file; it needs the same quirks. No hooks_dir: root's
# hooks live in podman's default /etc/containers/oci/hooks.d.
ROOT_CONF=/etc/containers/containers.conf
WANT_ROOT_CONF='# Written by scripts/podman-env.sh: quirks of the test machine, not product settings.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
'
mkdir -p /etc/containers
if [ -f "$ROOT_CONF" ] && [ "$(cat "$ROOT_CONF")" = "$(printf '%s' "$WANT_ROOT_CONF")" ]; then
    say "$ROOT_CONF is up to date"
else
    [ -f "$ROOT_CONF" ] && cp -p "$ROOT_CONF" "$ROOT_CONF.before-podman-env" && say "previous $ROOT_CONF saved as $ROOT_CONF.before-podman-env"
    printf '%s' "$WANT_ROOT_CONF" >"$ROOT_CONF"
    chmod 644 "$ROOT_CONF"
    say "wrote $ROOT_CONF (rootful podman: runtime runc, cgroupfs, file events, ulimits)"
fi

# --- /dev/net/tun --------------------------------------------------------------------------
if [ ! -c /dev/net/tun ]; then
    mkdir -p /dev/net
    mknod /dev/net/tun c 10 200
    say "created /dev/net/tun"
fi
chmod 666 /dev/net/tun
say "/dev/net/tun is mode 666 (slirp4netns)"

# --- podman as the user --------------------------------------------------------------------
# Every call is bounded: a wedged podman fails this script instead of hanging CI.
as_user() {
    (cd / && timeout 300 runuser -u "$E2E_USER" -- env -i XDG_RUNTIME_DIR="$RUNTIME_DIR" HOME="$E2E_HOME" \
        PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@")
}

# --- offline image -------------------------------------------------------------------------
have_recipe=$(as_user podman image inspect --format '{{index .Config.Labels "shield-test.recipe"}}' "$E2E_IMAGE" 2>/dev/null || true)
if [ "$have_recipe" = "$IMAGE_RECIPE" ]; then
    say "image $E2E_IMAGE is present (recipe $IMAGE_RECIPE)"
else
    work=$(mktemp -d /tmp/podman-env.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    root=$work/rootfs
    mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,root}
    chmod 1777 "$root/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    chmod 755 "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$root/etc/group"
    tar -C "$root" -cf "$work/rootfs.tar" .
    chmod 755 "$work"
    chmod 644 "$work/rootfs.tar"
    # Importing under the same tag leaves any older image untagged (containers that use it
    # keep working); nothing is removed.
    as_user podman import --quiet \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/bin' \
        --change "LABEL shield-test.recipe=$IMAGE_RECIPE" \
        "$work/rootfs.tar" "$E2E_IMAGE" >/dev/null
    say "imported $E2E_IMAGE from a static busybox ($("$BUSYBOX" --list | wc -l) applets)"
fi

# --- the same image for root (rootful podman has its own storage) ---------------------------
root_recipe=$(timeout 300 podman image inspect --format '{{index .Config.Labels "shield-test.recipe"}}' "$E2E_IMAGE" 2>/dev/null || true)
if [ "$root_recipe" = "$IMAGE_RECIPE" ]; then
    say "image $E2E_IMAGE is present for root (recipe $IMAGE_RECIPE)"
else
    # Copied from the user's storage: the same bytes, no second recipe to keep in step.
    as_user podman save --quiet "$E2E_IMAGE" | timeout 300 podman load --quiet >/dev/null
    say "loaded $E2E_IMAGE into root's storage (rootful e2e tests)"
fi

# --- smoke test ----------------------------------------------------------------------------
if out=$(as_user podman run --rm "$E2E_IMAGE" sh -c 'echo podman-env-ok' 2>&1) && [[ "$out" == *podman-env-ok* ]]; then
    say "smoke test: rootless 'podman run --rm $E2E_IMAGE' works as $E2E_USER"
else
    die "smoke test failed: rootless podman cannot run $E2E_IMAGE as $E2E_USER: $out"
fi
if out=$(cd / && timeout 300 podman run --rm --network none "$E2E_IMAGE" sh -c 'echo podman-env-ok' 2>&1) && [[ "$out" == *podman-env-ok* ]]; then
    say "smoke test: rootful 'podman run --rm $E2E_IMAGE' works as root"
else
    die "smoke test failed: rootful podman cannot run $E2E_IMAGE: $out"
fi
say "ready: run podman as: runuser -u $E2E_USER -- env XDG_RUNTIME_DIR=$RUNTIME_DIR HOME=$E2E_HOME PATH=/usr/sbin:/usr/bin:/sbin:/bin podman ..."

# shellcheck shell=bash
# The Debian packages fluidcloud's tests need, and how they are installed and
# checked. Sourced by scripts/setup and scripts/libvirt.
#
# The QEMU family comes from bookworm-backports, at the version of the
# preinstalled qemu-utils (the disk-image tests' oracle; bookworm's 7.2
# sizes VHDs differently). Which other packages must then come from
# backports too (seabios, libbrlapi0.8, ...) is not listed by hand: apt
# finds them once (`-t bookworm-backports` on the QEMU family alone), and
# the result is written as an apt preferences pin
# (/etc/apt/preferences.d/fluidcloud-qemu). Every install after that, ours
# or anyone's, resolves against the same pins, so qemu-img never drifts.
#
# `apt_check` proves an install from scratch works on a machine that
# already has everything: it simulates the whole install against a dpkg
# status in which none of these packages (nor what they pulled in) are
# installed. The preinstalled qemu-utils stays, as on a fresh machine.

# Install groups. A group is installed in one apt transaction; setup
# installs all groups in one.
APT_GROUPS=(peers qemu libvirt guest guestfs fuzz client postgres ui)
APT_peers=(rsync rclone)                   # benchmark peers
APT_qemu=(qemu-utils qemu-system-x86)      # QEMU family, from backports
APT_libvirt=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
APT_guest=(busybox-static cpio)            # the libvirt test guest's initramfs
# Inside guests (conduit/src/guest): libguestfs's appliance boots the
# kernel of linux-image-amd64; the root-filesystem test guests are made
# with sfdisk and mkfs.ext4 (e2fsprogs: in every Debian base system), the
# encrypted one with cryptsetup.
APT_guestfs=(libguestfs-tools linux-image-amd64 fdisk cryptsetup-bin)
APT_fuzz=(g++)                             # libFuzzer is built from C++ (scripts/fuzz)
APT_client=(curl)                          # raw HTTPS requests to site agents (tests/agents.rs)
APT_postgres=(postgresql)                  # the journal on PostgreSQL (scripts/postgres)
APT_ui=(chromium fonts-dejavu-core)        # the dashboard's browser tests (tests/ui.rs)
# The test guest's kernel: downloaded and unpacked, never installed.
APT_KERNEL=linux-image-amd64

APT_BACKPORTS=bookworm-backports
APT_BACKPORTS_LIST=/etc/apt/sources.list.d/fluidcloud-backports.list
APT_PIN_FILE=/etc/apt/preferences.d/fluidcloud-qemu
APT_LOG=${TMPDIR:-/tmp}/fluidcloud-apt.log

apt_say() { echo "${APT_WHO:-setup}: $*" >&2; }

apt_as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The packages of the named groups (all groups without arguments).
apt_packages() {
    local g groups=("$@")
    [ ${#groups[@]} -gt 0 ] || groups=("${APT_GROUPS[@]}")
    for g in "${groups[@]}"; do
        local -n list="APT_$g"
        printf '%s\n' "${list[@]}"
    done
}

apt_installed() { # PKG: exit 0 when dpkg has it installed
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# One line out of apt's output: the first unmet dependency
# ("qemu-system-x86 : Depends: seabios (> 1.16.3-1~) but 1.16.2-1 is to be
# installed"), else the first error.
apt_reason() { # LOGFILE
    local line
    line=$(grep -m1 -E '^ *[^ ]+ : (Depends|PreDepends|Breaks|Conflicts|Recommends): ' "$1" |
        sed -E 's/^ *([^ ]+) : /\1: /' || true)
    if [ -n "$line" ]; then
        local pkg=${line%%:*} rest=${line#*: }
        echo "cannot install $pkg: it $(echo "$rest" | sed -E 's/^Depends: /depends on /; s/^PreDepends: /pre-depends on /; s/^Breaks: /breaks /; s/^Conflicts: /conflicts with /')"
        return
    fi
    line=$(grep -m1 -E '^E: ' "$1" || true)
    echo "${line:-apt-get failed (see $1)}"
}

apt_fail() { # LOGFILE: the one-line reason, then exit 1
    apt_say "$(apt_reason "$1") (full output: $1)"
    exit 1
}

# One apt operation of ours at a time on this machine (two `apt-get
# update` fail on the lists lock; tests run set-up checks concurrently).
apt_lock() {
    exec 7>>"${TMPDIR:-/tmp}/fluidcloud-apt.lock"
    flock 7
}

# (Released as soon as the operation ends: a child script taking the lock
# while a parent holds it would wait forever.)
apt_unlock() {
    flock -u 7
    exec 7>&-
}

# bookworm-backports in the apt sources (added when missing), and the
# package lists no older than an hour.
apt_sources() {
    apt_lock
    local changed=
    if ! grep -rqs "$APT_BACKPORTS" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        echo "deb http://deb.debian.org/debian $APT_BACKPORTS main" | apt_as_root tee "$APT_BACKPORTS_LIST" >/dev/null
        changed=1
    fi
    local stamp=/var/lib/apt/lists/fluidcloud-updated
    if [ -n "$changed" ] || [ -z "$(find "$stamp" -mmin -60 2>/dev/null)" ]; then
        apt_say "apt-get update"
        apt_as_root apt-get update -qq >"$APT_LOG" 2>&1 || apt_fail "$APT_LOG"
        apt_as_root touch "$stamp"
    fi
    apt_unlock
}

# The version every package of the QEMU family is pinned to: the installed
# qemu-utils', else backports' candidate.
apt_qemu_version() {
    local v
    v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if [ -z "$v" ] || ! apt_installed qemu-utils; then
        v=$(apt-cache madison qemu-utils | awk -v s="$APT_BACKPORTS" '$0 ~ s && !p {print $3; p = 1}')
    fi
    [ -n "$v" ] || { apt_say "no qemu-utils in $APT_BACKPORTS"; exit 1; }
    echo "$v"
}

# A dpkg status file (to OUT) as if none of our packages, nor what only they
# pulled in, were installed: what `apt-get purge --autoremove` would leave.
# qemu-utils is kept: it is preinstalled on a fresh machine.
apt_fresh_status() { # OUT
    local out=$1 p removed
    local pkgs=()
    while read -r p; do [ "$p" = qemu-utils ] || pkgs+=("$p"); done < <(apt_packages)
    removed=$(apt-get -s purge --autoremove "${pkgs[@]}" 2>/dev/null |
        awk '/^Purg /{sub(/:.*/, "", $2); print $2}')
    awk -v removed="$removed" '
        BEGIN { n = split(removed, r, "\n"); for (i = 1; i <= n; i++) gone[r[i]] = 1; RS = ""; ORS = "\n\n" }
        { split($0, lines, "\n"); name = lines[1]; sub(/^Package: /, "", name); if (!(name in gone)) print }
    ' /var/lib/dpkg/status >"$out"
}

# Apt options that make a simulation or an install see the pins in PARTS
# (a preferences.d directory) and, when given, one more preferences file.
apt_opts() { # PARTS [EXTRA_PREFERENCES]
    echo "-o Dir::Etc::PreferencesParts=$1"
    if [ -n "${2:-}" ]; then echo "-o Dir::Etc::Preferences=$2"; fi
}

# Writes into PARTS/fluidcloud-qemu the pins of the packages that must come
# from backports: the QEMU family at the qemu-utils version, and whatever
# apt takes from backports to install it on a machine with STATUS.
apt_pins() { # STATUS PARTS [EXTRA_PREFERENCES]
    local status=$1 parts=$2 extra=${3:-} v log
    v=$(apt_qemu_version)
    log=$(mktemp)
    # shellcheck disable=SC2046
    if ! apt-get -s -o Dir::State::status="$status" $(apt_opts "$parts" "$extra") \
        install --no-install-recommends -t "$APT_BACKPORTS" \
        "qemu-system-x86=$v" "qemu-utils=$v" >"$log" 2>&1; then
        apt_fail "$log"
    fi
    {
        echo "# Written by fluidcloud's scripts/setup: the QEMU family at the installed"
        echo "# qemu-utils version, and what it needs from $APT_BACKPORTS."
        printf 'Package: qemu-utils\nPin: version %s\nPin-Priority: 990\n' "$v"
        awk '/^Inst / && /Backports/ {print $2, substr($3, 2)}' "$log" | sort -u |
            while read -r p ver; do
                printf '\nPackage: %s\nPin: version %s\nPin-Priority: 990\n' "$p" "$ver"
            done
    } >"$parts/fluidcloud-qemu"
    rm -f "$log"
}

# Fills PARTS with a copy of preferences.d in which our pin file is
# recomputed for a fresh machine.
apt_fresh_parts() { # PARTS STATUS [EXTRA_PREFERENCES]
    cp -a /etc/apt/preferences.d/. "$1/" 2>/dev/null || true
    rm -f "$1/fluidcloud-qemu"
    apt_pins "$2" "$1" "${3:-}"
}

# Simulates installing the groups (all without arguments) on a fresh
# machine; prints what would be installed. EXTRA_PREFERENCES (env
# APT_EXTRA_PREFERENCES) is one more preferences file, for tests.
apt_check() {
    apt_sources
    local status parts log extra=${APT_EXTRA_PREFERENCES:-}
    status=$(mktemp)
    parts=$(mktemp -d)
    log=$(mktemp)
    apt_fresh_status "$status"
    apt_fresh_parts "$parts" "$status" "$extra"
    mapfile -t pkgs < <(apt_packages "$@")
    # shellcheck disable=SC2046
    if ! apt-get -s -o Dir::State::status="$status" $(apt_opts "$parts" "$extra") \
        install --no-install-recommends "${pkgs[@]}" >"$log" 2>&1; then
        apt_fail "$log"
    fi
    apt_say "check: apt can install ${pkgs[*]} from scratch ($(grep -c '^Inst ' "$log") packages)"
    apt_check_kernel
    rm -rf "$status" "$parts" "$log"
}

# (Readers consume all of a pipe's input: under `pipefail`, one that quits
# early kills the writer with SIGPIPE and fails the pipeline at random.)
apt_kernel_package() {
    apt-cache depends "$APT_KERNEL" 2>/dev/null | awk '/Depends: linux-image-/ && !p {print $2; p = 1}'
}

apt_check_kernel() {
    local pkg
    pkg=$(apt_kernel_package)
    if [ -z "$pkg" ] || ! apt-cache show "$pkg" 2>/dev/null | grep '^Filename: ' >/dev/null; then
        apt_say "cannot resolve $APT_KERNEL (the test guest's kernel) in the apt sources"
        exit 1
    fi
}

# Installs the groups (all without arguments): nothing when every package is
# installed; else one apt transaction, after the pins are (re)written.
apt_install() {
    mapfile -t pkgs < <(apt_packages "$@")
    local missing=() p
    for p in "${pkgs[@]}"; do apt_installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} -gt 0 ] || return 0
    apt_sources
    local status parts
    status=$(mktemp)
    parts=$(mktemp -d)
    apt_fresh_status "$status"
    apt_fresh_parts "$parts" "$status"
    apt_as_root install -m 0644 "$parts/fluidcloud-qemu" "$APT_PIN_FILE"
    rm -rf "$status" "$parts"
    apt_say "installing ${missing[*]}"
    apt_lock
    if ! DEBIAN_FRONTEND=noninteractive apt_as_root apt-get install -y --no-install-recommends \
        "${pkgs[@]}" >"$APT_LOG" 2>&1; then
        apt_fail "$APT_LOG"
    fi
    apt_unlock
}

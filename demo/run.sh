#!/usr/bin/env bash
# personalityd demo: three personality volumes stacked over a sandbox base, driven through the
# spool directory. Run as root (`make demo`). Everything happens under demo/work/ and inside a
# private mount namespace, so no mount is visible outside and all of them die with the demo.
#
#   demo/run.sh          run the demo (cleans demo/work/ before and after; KEEP_WORK=1 keeps it)
#   demo/run.sh clean    detach leftover loop devices backed by demo/work/ files, remove it
#
# What it uses on the machine: loop devices (only the ones it attaches, detached by name at
# the end), systemd-udevd and systemd-journald (started if not running, stopped at the end if
# it started them), a runtime udev rule /run/udev/rules.d/61-personalityd-demo-*.rules (removed
# at the end), and a private dbus-daemon for the D-Bus API.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
WORK=$HERE/work
ROOT=$WORK/root
CFG=$WORK/personalityd.toml
LOG=$WORK/personalityd.log
SPOOL=$ROOT/var/spool/personalityd
PY=${PYTHON:-$REPO/.venv/bin/python}
CONFLICT_ID=3e47b2d0af514d77b3126415a1549afb
SUMMARY_ID=745778a2970b4475acba70df8299437b
BUS=org.personalityd.personality1
OBJ=/org/personalityd/personality1

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (loop devices, mounts, udev)"

pids_named() {  # PIDs whose /proc/PID/comm is exactly $1
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
    done
    true
}

detach_ours() {  # losetup -d DEV only while DEV is still backed by IMAGE
    local dev=$1 image=$2 backing
    backing=$(cat "/sys/block/${dev#/dev/}/loop/backing_file" 2>/dev/null || true)
    if [ "$backing" = "$image" ]; then losetup -d "$dev" || true; fi
}

unmount_under() {  # lazily unmount everything at or below $1 (our namespace only), deepest first
    local mp
    for _ in 1 2 3; do
        awk -v top="$1" '{ mp = $5; gsub(/\\040/, " ", mp)
                           if (mp == top || index(mp, top "/") == 1) print mp }' \
            /proc/self/mountinfo | tac | while IFS= read -r mp; do
            umount --lazy "$mp" 2>/dev/null || true
        done
    done
}

clean_work() {  # leftovers of an earlier demo run: its loop devices, then the tree
    local line dev backing
    if [ -d "$WORK" ]; then
        while IFS= read -r line; do
            dev=${line%%:*}
            backing=$(cat "/sys/block/${dev#/dev/}/loop/backing_file" 2>/dev/null || true)
            case $backing in "$WORK"/*) losetup -d "$dev" || true ;; esac
        done < <(losetup -a 2>/dev/null || true)
        unmount_under "$WORK"
        if grep -q " $WORK[ /]" /proc/self/mountinfo; then
            die "something is still mounted under $WORK; not removing it"
        fi
        rm -rf --one-file-system "$WORK"
    fi
    local rule pid
    for rule in /run/udev/rules.d/61-personalityd-demo-*.rules; do  # of demos killed by -9
        [ -e "$rule" ] || continue
        pid=${rule##*-}; pid=${pid%.rules}
        if ! kill -0 "$pid" 2>/dev/null; then rm -f "$rule"; fi
    done
}

if [ "${1:-}" = clean ]; then
    clean_work
    exit 0
fi

# Re-run this script in a private mount namespace: the daemon, its mounts and this driver
# share it, and every mount is gone when the demo ends, whatever happens.
if [ -z "${PERSONALITYD_DEMO_NS:-}" ]; then
    export PERSONALITYD_DEMO_NS=1
    exec unshare -m --propagation private -- "$0" "$@"
fi

[ -x "$PY" ] || die "$PY missing: run \`make deps\` (or \`make demo\`) first"

START=$(date +%s.%N)
TOKEN=demo-$$
RULE=/run/udev/rules.d/61-personalityd-$TOKEN.rules
DAEMON_PID=
DBUS_PID=
STARTED_UDEVD=
STARTED_JOURNALD=
declare -A LOOPS=()  # device -> image it was attached to

# Global services are started in PID 1's mount namespace, not in our private one.
# (Where PID 1's namespace is out of reach, they start in ours and stop with the demo.)
HOSTNS=()
if [ "$(readlink /proc/1/ns/mnt 2>/dev/null)" != "$(readlink /proc/self/ns/mnt)" ] &&
    nsenter --mount=/proc/1/ns/mnt -- true 2>/dev/null; then
    HOSTNS=(nsenter --mount=/proc/1/ns/mnt --)
fi

stop_pid() {  # SIGTERM, up to 10 s, then SIGKILL
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$? dev
    trap - EXIT INT TERM
    set +e
    say "Cleaning up"
    if [ -n "$DAEMON_PID" ]; then stop_pid "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null; fi
    if [ "$status" != 0 ] && [ -f "$LOG" ]; then
        echo "--- last 60 lines of the daemon log ($LOG) ---"
        tail -n 60 "$LOG"
    fi
    if [ -n "$DBUS_PID" ]; then stop_pid "$DBUS_PID"; wait "$DBUS_PID" 2>/dev/null; fi
    unmount_under "$WORK"
    udevadm settle --timeout=10 2>/dev/null
    for dev in "${!LOOPS[@]}"; do detach_ours "$dev" "${LOOPS[$dev]}"; done
    if [ -f "$RULE" ]; then rm -f "$RULE"; udevadm control --reload; fi
    [ -n "$STARTED_UDEVD" ] && stop_pid "$STARTED_UDEVD"
    [ -n "$STARTED_JOURNALD" ] && stop_pid "$STARTED_JOURNALD"
    if [ "${KEEP_WORK:-0}" = 1 ]; then
        echo "kept $WORK"
    elif grep -q " $WORK[ /]" /proc/self/mountinfo; then
        echo "not removing $WORK: something is still mounted there" >&2
    else
        rm -rf --one-file-system "$WORK"
    fi
    [ "$status" = 0 ] && echo "demo finished" || echo "demo FAILED (exit $status)" >&2
    exit "$status"
}
trap cleanup EXIT
trap 'echo "demo: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_services() {
    local before after pid jbefore jafter
    if [ -z "$(pids_named systemd-udevd)" ]; then
        before=$(pids_named systemd-udevd)
        "${HOSTNS[@]}" /lib/systemd/systemd-udevd --daemon
        for _ in $(seq 50); do
            after=$(pids_named systemd-udevd)
            [ -n "$after" ] && [ -e /run/udev/control ] && break
            sleep 0.1
        done
        for pid in $after; do
            grep -qx "$pid" <<<"$before" || { STARTED_UDEVD=$pid; break; }
        done
        [ -n "$STARTED_UDEVD" ] || die "systemd-udevd did not start"
        echo "started systemd-udevd (PID $STARTED_UDEVD)"
    fi
    if ! journal_listening; then
        jbefore=$(pids_named systemd-journal)  # comm is cut to 15 characters
        setsid "${HOSTNS[@]}" /usr/lib/systemd/systemd-journald </dev/null >/dev/null 2>&1 &
        for _ in $(seq 50); do journal_listening && break; sleep 0.1; done
        journal_listening || die "systemd-journald did not start"
        jafter=$(pids_named systemd-journal)
        for pid in $jafter; do
            grep -qx "$pid" <<<"$jbefore" || { STARTED_JOURNALD=$pid; break; }
        done
        echo "started systemd-journald (PID ${STARTED_JOURNALD:-?})"
    fi
}

journal_listening() {
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try: s.connect("/run/systemd/journal/socket")
except OSError: sys.exit(1)' 2>/dev/null
}

attach() {  # attach VAR IMAGE [rw]: losetup, remember the device, store it in VAR
    local var=$1 image=$2 mode=${3:-ro} dev
    if [ "$mode" = rw ]; then
        dev=$(losetup --find --show "$image")
        blockdev --setrw "$dev"  # a kernel read-only flag left on the loop device by its last user
    else
        dev=$(losetup --find --show --read-only "$image")
    fi
    LOOPS[$dev]=$image
    udevadm settle --timeout=30
    printf -v "$var" '%s' "$dev"
}

show_udev() {
    local dev=$1
    printf '  %-11s %-40s %s\n' "$dev" "${LOOPS[$dev]#"$WORK"/}" "$(udevadm info --query=property \
        --name="$dev" | grep -E '^(ID_FS_TYPE|ID_FS_LABEL|PERSONALITYD_VOLUME)=' | tr '\n' ' ')"
}

wait_ready() {
    local i
    for i in $(seq 300); do
        kill -0 "$DAEMON_PID" 2>/dev/null || die "personalityd exited before it was ready"
        if [ -d "$SPOOL" ] && [ -d "$ROOT/var/lib/personalityd" ] && grep -q daemon_ready "$LOG"
        then
            return 0
        fi
        sleep 0.1
    done
    die "personalityd not ready after 30 s"
}

request() {  # request NAME JSON: drop a spool request, wait for and print its result
    local name=$1 body=$2 i where
    echo "request $name.json: $body"
    printf '%s\n' "$body" >"$SPOOL/.tmp-$name"
    mv "$SPOOL/.tmp-$name" "$SPOOL/$name.json"
    for i in $(seq 600); do
        for where in done failed; do
            if [ -f "$SPOOL/$where/$name.result.json" ]; then
                echo "result ($where/$name.result.json):"
                python3 -m json.tool "$SPOOL/$where/$name.result.json" | sed 's/^/  /'
                [ "$where" = done ] && return 0
                die "request $name failed"
            fi
        done
        sleep 0.1
    done
    die "no result for request $name after 60 s"
}

show_stack() {
    local f
    echo "ls root/opt/personality:"
    ls -l "$ROOT/opt/personality" 2>&1 | sed 's/^/  /'
    for f in usr/bin/python-tool usr/share/doc/common/README etc/motd; do
        if [ -e "$ROOT/$f" ]; then
            printf '  %-30s -> %s\n' "/$f" "$(head -n 2 "$ROOT/$f" | tail -n 1)"
        else
            printf '  %-30s (absent)\n' "/$f"
        fi
    done
    for f in usr/bin/jupyter-lab usr/sbin/nginx usr/games/server; do
        if [ -e "$ROOT/$f" ]; then printf '  %-30s present\n' "/$f"
        else printf '  %-30s (absent)\n' "/$f"; fi
    done
}

# ---------------------------------------------------------------------------------------------

say "Preparing $WORK"
clean_work
mkdir -p "$WORK"
ensure_services
"$PY" "$HERE/make_volumes.py" "$WORK"

say "udev rule: mark this demo's loop devices as personality volumes"
# The default volumes.match would also take any other squashfs/erofs volume on this machine
# (other demos, test runs). So the demo uses the documented admin mechanism: a udev
# rule that sets PERSONALITYD_VOLUME=1, here only on loop devices backed by demo/work files.
mkdir -p /run/udev/rules.d
cat >"$RULE" <<EOF
SUBSYSTEM=="block", KERNEL=="loop[0-9]*", ATTR{loop/backing_file}=="$WORK/volumes/*", ENV{PERSONALITYD_VOLUME}="1", ENV{PERSONALITYD_DEMO}="$TOKEN"
SUBSYSTEM=="block", KERNEL=="loop[0-9]*", ATTR{loop/backing_file}=="$WORK/data/*", ENV{PERSONALITYD_DEMO}="$TOKEN"
EOF
sed 's/^/  /' "$RULE"
udevadm control --reload

say "Attaching the writable volume and two personality volumes (before the daemon starts)"
attach DATA_DEV "$WORK/data/data.ext4" rw
attach DS_DEV "$WORK/volumes/datascience.squashfs"
attach WEB_DEV "$WORK/volumes/web.erofs"
for dev in "$DATA_DEV" "$DS_DEV" "$WEB_DEV"; do show_udev "$dev"; done

cat >"$CFG" <<EOF
# personalityd demo configuration (paths below are relative to root)
root = "$ROOT"

[volumes]
mount_root = "/opt/personality"
match = [{ PERSONALITYD_VOLUME = "1", PERSONALITYD_DEMO = "$TOKEN" }]

[writable]
match = [{ ID_FS_LABEL = "personality-data", PERSONALITYD_DEMO = "$TOKEN" }]
fallback = "none"

[spool]
dir = "/var/spool/personalityd"

[state]
dir = "/var/lib/personalityd"
runtime_dir = "/run/personalityd"
EOF
say "Configuration ($CFG)"
sed 's/^/  /' "$CFG"

say "Starting personalityd on a private D-Bus"
dbus-daemon --session --nofork --nopidfile --print-address=1 >"$WORK/bus.address" 2>&1 &
DBUS_PID=$!
for _ in $(seq 50); do [ -s "$WORK/bus.address" ] && break; sleep 0.1; done
DBUS_ADDRESS=$(head -n 1 "$WORK/bus.address")
[ -n "$DBUS_ADDRESS" ] || die "dbus-daemon did not start"
export DBUS_SYSTEM_BUS_ADDRESS=$DBUS_ADDRESS
PYTHONPATH=$REPO/daemon${PYTHONPATH:+:$PYTHONPATH} \
    "$PY" -m personalityd --root "$ROOT" --config "$CFG" 2>"$LOG" &
DAEMON_PID=$!
wait_ready
echo "personalityd is ready (PID $DAEMON_PID, log $LOG)"
show_stack

say "Step 1: attach datascience"
request 01-attach-datascience '{"action": "attach", "personality": "datascience", "id": "step-1"}'
show_stack

say "Step 2: attach web (on top of datascience: web's python-tool wins)"
request 02-attach-web '{"action": "attach", "personality": "web", "id": "step-2"}'
show_stack

say "Dropping the gameserver image file into a search path while the daemon runs"
# No losetup: the daemon finds the file (inotify), checks who owns it, and attaches it through
# a read-only loop device of its own when it is asked for.
IMAGES=$ROOT/var/lib/personalities
install -d -m 0755 "$IMAGES"
install -m 0644 "$WORK/volumes/gameserver.ext4" "$IMAGES/.gameserver.img.part"
mv "$IMAGES/.gameserver.img.part" "$IMAGES/gameserver.img"
echo "  $IMAGES/gameserver.img"
for _ in $(seq 100); do grep -q 'event=image_found name=gameserver' "$LOG" && break; sleep 0.1; done
PYTHONPATH=$REPO/daemon${PYTHONPATH:+:$PYTHONPATH} "$PY" -m personalityd.client.cli list |
    sed 's/^/  /'

say "Step 3: switch to [web, gameserver] (datascience goes; gameserver on top)"
request 03-switch '{"action": "switch", "personalities": ["web", "gameserver"], "id": "step-3", "timeout": 10}'
show_stack

say "Writing through the stacked /etc"
echo "written through the stack by the demo at $(date -Is)" >"$ROOT/etc/demo-note.conf"
echo "root/etc/demo-note.conf: $(cat "$ROOT/etc/demo-note.conf")"

say "Conflicts recorded in the journal (MESSAGE_ID=$CONFLICT_ID, this daemon only)"
journalctl -o json --no-pager --since "@$START" _PID="$DAEMON_PID" MESSAGE_ID="$CONFLICT_ID" |
    python3 -c '
import json, sys
def listed(v):
    return v if isinstance(v, list) else [v]
rows = [json.loads(line) for line in sys.stdin if line.strip()]
for e in rows:
    print("  generation {:>3}  {:<32} winner {:<12} shadows {:<24} identical={}".format(
        e.get("PERSONALITY_GENERATION", "?"), e.get("PERSONALITY_PATH", "?"),
        e.get("PERSONALITY_WINNER", "?"), ",".join(listed(e.get("PERSONALITY_SHADOWED", []))),
        "yes" if e.get("PERSONALITY_IDENTICAL") == "1" else "no"))
    print("                   " + e.get("MESSAGE", ""))
if not rows:
    print("  (no conflict entries found)")
'
echo "stack summaries (MESSAGE_ID=$SUMMARY_ID):"
journalctl -o json --no-pager --since "@$START" _PID="$DAEMON_PID" MESSAGE_ID="$SUMMARY_ID" |
    python3 -c '
import json, sys
for line in sys.stdin:
    e = json.loads(line)
    print("  generation {:>3}  attached [{}]  conflicts {}  overrides {}".format(
        e.get("PERSONALITY_GENERATION", "?"), e.get("PERSONALITY_ATTACHED", ""),
        e.get("PERSONALITY_CONFLICTS", "?"), e.get("PERSONALITY_OVERRIDES", "?")))
'
echo "(read back with: journalctl -o json --since @$START _PID=$DAEMON_PID MESSAGE_ID=$CONFLICT_ID)"

say "The same over D-Bus"
busctl --address="$DBUS_ADDRESS" call "$BUS" "$OBJ" "$BUS.Manager" ListPersonalities ||
    echo "  (D-Bus call failed)"
busctl --address="$DBUS_ADDRESS" call "$BUS" "$OBJ" "$BUS.Manager" ListConflicts ||
    echo "  (D-Bus call failed)"
if [ -x "$REPO/.venv/bin/personalityctl" ]; then
    echo "personalityctl list:"
    "$REPO/.venv/bin/personalityctl" list || echo "  (personalityctl failed)"
fi

say "Stopping personalityd (SIGTERM): the live stack stays mounted"
stop_pid "$DAEMON_PID"
wait "$DAEMON_PID" && echo "personalityd exited with status 0" ||
    echo "personalityd exited with status $?"
DAEMON_PID=
show_stack

say "The note landed on the writable volume ($DATA_DEV)"
unmount_under "$ROOT"
{ findmnt -rn -S "$DATA_DEV" -o TARGET || true; } | tac | while IFS= read -r mp; do
    umount --lazy "$mp"
done
mkdir -p "$WORK/inspect"
mount -o ro "$DATA_DEV" "$WORK/inspect"
echo "files under upper/ on the writable volume:"
(cd "$WORK/inspect" && find upper -maxdepth 2 | sort | sed 's/^/  /')
echo "upper/_etc/demo-note.conf: $(cat "$WORK/inspect/upper/_etc/demo-note.conf")"
umount "$WORK/inspect"

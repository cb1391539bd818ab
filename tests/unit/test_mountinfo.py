"""mountinfo parsing and the choice of the mounts a swap carries below a hierarchy."""

from __future__ import annotations

from personalityd.adapters.mountinfo import (
    parse_mountinfo,
    same_mount_source,
    submounts_below,
)

# id parent major:minor root mount-point options - fstype source super-options
TABLE = """\
1 0 254:0 / / rw - ext4 /dev/vda rw
20 1 254:0 / /etc rw - overlay personalityd ro
21 1 0:40 / /usr/local rw - tmpfs tmpfs rw
30 20 254:0 /srv/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw
31 20 0:41 / /etc/a rw - tmpfs one rw
32 31 0:42 / /etc/a/b rw - tmpfs nested rw
33 20 0:43 / /etc/a/c/d rw - tmpfs hidden-by-a rw
34 20 0:44 / /etc/x\\040y rw - tmpfs spaced rw
35 1 254:0 /srv/resolv.conf /etc/resolv.conf rw - ext4 /dev/vda rw
36 20 0:45 / /etcetera rw - tmpfs not-below rw
"""


def test_the_mounts_reached_first_below_the_mount_a_hierarchy_shows() -> None:
    entries = parse_mountinfo(TABLE)
    points = [e.mount_point for e in submounts_below(entries, 20, "/etc")]
    # On the overlay (20): not /etc/a/b (inside /etc/a), not /etc/a/c/d (hidden by /etc/a),
    # not /etcetera (not below /etc); not 35 (on the base beneath the overlay).
    assert points == ["/etc/a", "/etc/resolv.conf", "/etc/x y"]
    base = [e.mount_point for e in submounts_below(entries, 1, "/etc")]
    assert base == ["/etc/resolv.conf"]
    assert [e.mount_point for e in submounts_below(entries, 1, "/usr")] == ["/usr/local"]


def test_a_clone_has_the_same_source_as_its_original() -> None:
    by_id = {e.mount_id: e for e in parse_mountinfo(TABLE)}
    assert same_mount_source(by_id[30], by_id[35])
    assert not same_mount_source(by_id[31], by_id[32])

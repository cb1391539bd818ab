"""The harness of personalityd's integration tests, stress suite and benchmarks.

Everything works on the real machine: the global udevd and loop devices, the system journal, a
private dbus-daemon, the daemon started as a subprocess. Every helper that creates something
also knows how to remove exactly that, by name or by PID, so that several runs can share one
machine. One module per job:

    paths      where the repository is
    contract   names from the design contract (bus names, MESSAGE_IDs, default paths)
    processes  running commands; finding and stopping processes by PID
    polling    waiting for a condition
    namespace  re-running a program in a private mount namespace
    udev       udevd, settling, properties, `udevadm monitor`, the tagging rule
    loops      loop devices attached by one test or benchmark
    images     file trees and personality images (squashfs, erofs, ext4)
    ddi        GPT disk images holding a personality in a DPS root or usr partition
    signing    gpg keys, SHA256SUMS and their detached signatures (images.verify)
    mounts     reading /proc/self/mountinfo, unmounting test-owned trees
    sandbox    the minimal base OS tree the daemon stacks onto
    journal    journald for tests, reading entries back with journalctl
    config     the daemon's TOML config: writing it, merging overrides
    daemon     personalityd run as a subprocess (`Daemon`)
    spool      spool requests: dropping them, waiting for results (inotify)
    stack      what a user observes of a stack after faults and load (stress checks)
    dbus       a private system bus, calls on the Manager interface, collected signals
    users      a temporary member of the `personality` group
    sysext     the real systemd-sysext on a sandbox root: images, merge, what it merged
"""

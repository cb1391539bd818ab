"""adapters/trustedpath.py on real trees: ownership and modes of everything on the way, symlinks
resolved inside root, the views of stacked hierarchies, and swaps during the walk.

Each test builds its own root under tmp_path (root-owned, 0755, as the tests run as root) and
chowns or chmods one thing to make its case."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from image_entries import mkdirs, write

from personalityd.adapters.trustedpath import (
    MAX_SYMLINKS,
    Opened,
    UntrustedPath,
    Want,
    check_trusted_dir,
    open_trusted,
    trace_path,
)

pytestmark = pytest.mark.integration

USER = 1000


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = mkdirs(tmp_path / "root")
    for directory in ("etc/personalities", "run", "var/lib/personalities", "usr/lib"):
        mkdirs(root / directory)
    os.chmod(root / "var", 0o755)
    os.chmod(root / "var/lib", 0o755)
    os.chmod(root / "etc", 0o755)
    os.chmod(root / "usr", 0o755)
    return root


def read_all(result: Opened) -> bytes:
    try:
        return os.pread(result.fd, 1 << 16, 0)
    finally:
        os.close(result.fd)


def refusal(root: Path, path: str, **kw: object) -> str:
    with pytest.raises(UntrustedPath) as caught:
        result = open_trusted(str(root), path, **kw)  # type: ignore[arg-type]
        os.close(result.fd)
    return str(caught.value)


def test_a_trusted_file_is_opened_read_only(root: Path) -> None:
    image = write(root / "var/lib/personalities/web.raw", b"web image")
    result = open_trusted(str(root), "/var/lib/personalities/web.raw")
    assert result.logical_path == f"{root}/var/lib/personalities/web.raw"
    assert result.symlinks == ()
    assert (result.st.st_dev, result.st.st_ino) == (os.stat(image).st_dev, os.stat(image).st_ino)
    assert os.get_blocking(result.fd)
    with pytest.raises(OSError):
        os.write(result.fd, b"x")
    assert read_all(result) == b"web image"


def test_root_slash_shows_paths_without_a_prefix(root: Path) -> None:
    # The real `/` is owned by root and 0755 on any sane machine; a trusted read of it.
    result = open_trusted("/", "/", want="dir")
    try:
        assert result.logical_path == "/"
    finally:
        os.close(result.fd)


def test_entry_not_owned_by_root(root: Path) -> None:
    image = write(root / "var/lib/personalities/web.raw")
    os.chown(image, USER, USER)
    assert refusal(root, "/var/lib/personalities/web.raw") == (
        f"{root}/var/lib/personalities/web.raw is owned by uid 1000, not root"
    )


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        (0o664, "is writable by its group (mode 0664)"),
        (0o646, "is writable by others (mode 0646)"),
        (0o666, "is writable by others (mode 0666)"),
    ],
)
def test_entry_writable_by_others(root: Path, mode: int, problem: str) -> None:
    write(root / "var/lib/personalities/web.raw", mode=mode)
    assert refusal(root, "/var/lib/personalities/web.raw") == (
        f"{root}/var/lib/personalities/web.raw {problem}"
    )


def test_entry_may_be_read_only_for_everyone_or_root_only(root: Path) -> None:
    for mode in (0o400, 0o444, 0o600, 0o755):
        write(root / "var/lib/personalities/web.raw", mode=mode)
        os.close(open_trusted(str(root), "/var/lib/personalities/web.raw").fd)


def test_symlink_owned_by_a_user(root: Path) -> None:
    write(root / "var/lib/personalities/web_1.2.raw")
    link = root / "var/lib/personalities/web.raw"
    link.symlink_to("web_1.2.raw")
    os.lchown(link, USER, USER)
    assert refusal(root, "/var/lib/personalities/web.raw") == (
        f"{root}/var/lib/personalities/web.raw is a symlink owned by uid 1000, not root"
    )


def test_symlink_target_not_owned_by_root(root: Path) -> None:
    target = write(root / "var/lib/personalities/web_1.2.raw")
    os.chown(target, USER, USER)
    (root / "var/lib/personalities/web.raw").symlink_to("web_1.2.raw")
    assert refusal(root, "/var/lib/personalities/web.raw") == (
        f"{root}/var/lib/personalities/web_1.2.raw is owned by uid 1000, not root"
    )


def test_symlink_followed_is_reported(root: Path) -> None:
    write(root / "var/lib/personalities/web_1.2.raw", b"v1.2")
    (root / "var/lib/personalities/web.raw").symlink_to("web_1.2.raw")
    (root / "etc/personalities/web.raw").symlink_to("/var/lib/personalities/web.raw")
    result = open_trusted(str(root), "/etc/personalities/web.raw")
    assert result.logical_path == f"{root}/var/lib/personalities/web_1.2.raw"
    assert result.symlinks == (
        f"{root}/etc/personalities/web.raw",
        f"{root}/var/lib/personalities/web.raw",
    )
    assert read_all(result) == b"v1.2"


@pytest.mark.parametrize(
    "directory", ["", "var", "var/lib", "var/lib/personalities"], ids=["root", "var", "lib", "dir"]
)
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_directory_on_the_way_writable_by_others(root: Path, directory: str, mode: int) -> None:
    write(root / "var/lib/personalities/web.raw")
    os.chmod(root / directory, mode)
    shown = f"{root}/{directory}".rstrip("/")
    who = "others" if mode & 0o002 else "its group"
    expected = f"{shown} is writable by {who} (mode {mode:04o})"
    assert refusal(root, "/var/lib/personalities/web.raw") == expected
    with pytest.raises(UntrustedPath, match=re.escape(expected)):
        check_trusted_dir(str(root), "/var/lib/personalities")


def test_directory_on_the_way_owned_by_a_user(root: Path) -> None:
    write(root / "var/lib/personalities/web.raw")
    os.chown(root / "var/lib", USER, 0)
    assert refusal(root, "/var/lib/personalities/web.raw") == (
        f"{root}/var/lib is owned by uid 1000, not root"
    )


def test_directory_in_a_symlinks_target_is_checked_too(root: Path) -> None:
    store = mkdirs(root / "srv/images", 0o777)
    write(store / "web.raw")
    (root / "etc/personalities/web.raw").symlink_to("../../srv/images/web.raw")
    assert refusal(root, "/etc/personalities/web.raw") == (
        f"{root}/srv/images is writable by others (mode 0777)"
    )


def test_check_trusted_dir(root: Path) -> None:
    check_trusted_dir(str(root), "/var/lib/personalities")
    with pytest.raises(FileNotFoundError) as missing:
        check_trusted_dir(str(root), "/run/personalities")
    assert missing.value.filename == f"{root}/run/personalities"
    write(root / "run/personalities")
    assert refusal(root, "/run/personalities", want="dir") == (
        f"{root}/run/personalities is a regular file, not a directory"
    )


def test_missing_and_not_a_directory_name_the_logical_path(root: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        open_trusted(str(root), "/var/lib/personalities/web.raw")
    assert missing.value.filename == f"{root}/var/lib/personalities/web.raw"
    write(root / "var/lib/personalities/file")
    with pytest.raises(NotADirectoryError) as not_dir:
        open_trusted(str(root), "/var/lib/personalities/file/web.raw")
    assert not_dir.value.filename == f"{root}/var/lib/personalities/file"
    assert "regular file" in str(not_dir.value)


def test_wrong_kind(root: Path) -> None:
    assert refusal(root, "/var/lib/personalities") == (
        f"{root}/var/lib/personalities is a directory, not a regular file"
    )
    write(root / "var/lib/personalities/web.raw")
    assert refusal(root, "/var/lib/personalities/web.raw", want="dir") == (
        f"{root}/var/lib/personalities/web.raw is a regular file, not a directory"
    )
    for path, want in (("/var/lib/personalities/web.raw", "any"), ("/var/lib", "any")):
        os.close(open_trusted(str(root), path, want=want).fd)  # type: ignore[arg-type]


def test_directory_is_opened_for_listing(root: Path) -> None:
    write(root / "var/lib/personalities/web.raw")
    result = open_trusted(str(root), "/var/lib/personalities", want="dir")
    try:
        assert os.listdir(result.fd) == ["web.raw"]
        assert result.logical_path == f"{root}/var/lib/personalities"
    finally:
        os.close(result.fd)


def _in_thread(call: Callable[[], object]) -> object:
    """Run `call` in a thread; fail (not hang) when it blocks."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        pytest.fail("open_trusted blocked")
    return outcome[0]


@pytest.mark.parametrize("want", ["file", "any"])
def test_fifo_and_devices_are_refused_without_opening_them(root: Path, want: Want) -> None:
    directory = root / "var/lib/personalities"
    os.mkfifo(directory / "fifo.raw", 0o644)
    os.mknod(directory / "char.raw", 0o644 | 0o020000, os.makedev(1, 3))
    os.mknod(directory / "block.raw", 0o644 | 0o060000, os.makedev(7, 250))
    (directory / "link.raw").symlink_to("fifo.raw")
    cases = {
        "fifo.raw": "fifo.raw is a FIFO",
        "char.raw": "char.raw is a character device",
        "block.raw": "block.raw is a block device",
        "link.raw": "fifo.raw is a FIFO",
    }
    for name, expected in cases.items():
        path = f"/var/lib/personalities/{name}"
        outcome = _in_thread(functools.partial(open_trusted, str(root), path, want=want))
        assert isinstance(outcome, UntrustedPath), outcome
        assert str(outcome).startswith(f"{directory}/{expected}, not a regular file")


def test_symlink_loops(root: Path) -> None:
    directory = root / "etc/personalities"
    (directory / "a.raw").symlink_to("b.raw")
    (directory / "b.raw").symlink_to("./a.raw")
    (directory / "self.raw").symlink_to("/etc/personalities/self.raw")
    for name in ("a.raw", "self.raw"):
        with pytest.raises(OSError) as caught:
            open_trusted(str(root), f"/etc/personalities/{name}")
        assert caught.value.errno == 40
        assert caught.value.filename == f"{directory}/{name}"
        assert "more than 40" in str(caught.value)


@pytest.mark.parametrize(("links", "ok"), [(MAX_SYMLINKS, True), (MAX_SYMLINKS + 1, False)])
def test_at_most_40_symlinks(root: Path, links: int, ok: bool) -> None:
    directory = root / "etc/personalities"
    write(directory / "end.raw", b"end")
    for i in range(links):
        target = "end.raw" if i == links - 1 else f"l{i + 1}.raw"
        (directory / f"l{i}.raw").symlink_to(target)
    if ok:
        result = open_trusted(str(root), "/etc/personalities/l0.raw")
        assert len(result.symlinks) == links
        assert read_all(result) == b"end"
    else:
        with pytest.raises(OSError, match="more than 40"):
            open_trusted(str(root), "/etc/personalities/l0.raw")


@pytest.fixture
def outside(tmp_path: Path, root: Path) -> Path:
    """A file of the same name outside root and inside it: the walk must find the inside one."""
    write(tmp_path / "outside.raw", b"outside root")
    write(tmp_path / "etc/personalities/web.raw", b"outside root")
    return write(root / "outside.raw", b"inside root")


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/outside.raw", "/etc/personalities/web.raw"),
        ("../../../../../../../../outside.raw", "/etc/personalities/web.raw"),
        ("/../../../outside.raw", "/etc/personalities/web.raw"),
        (None, "/../../../outside.raw"),
        (None, "/etc/../../outside.raw"),
    ],
)
def test_symlinks_and_dotdot_stay_inside_root(
    root: Path, outside: Path, target: str | None, path: str
) -> None:
    if target is not None:
        (root / "etc/personalities/web.raw").symlink_to(target)
    result = open_trusted(str(root), path)
    assert result.logical_path == f"{root}/outside.raw"
    assert read_all(result) == b"inside root"


def test_absolute_symlink_inside_root_with_dotdot_inside_the_target(root: Path) -> None:
    write(root / "var/lib/personalities/web_2.raw", b"two")
    (root / "etc/personalities/web.raw").symlink_to("/var/lib/../lib/personalities/./web_2.raw")
    result = open_trusted(str(root), "/etc/personalities/web.raw")
    assert result.logical_path == f"{root}/var/lib/personalities/web_2.raw"
    assert read_all(result) == b"two"


@pytest.fixture
def base(tmp_path: Path, root: Path) -> Path:
    """A fake base reference of /usr, and the stacked /usr holding other content."""
    base = mkdirs(tmp_path / "base-usr")
    write(base / "lib/personalities/web.raw", b"from the base")
    write(root / "usr/lib/personalities/web.raw", b"from the stack")
    write(root / "usr/lib/personalities/evil.raw", b"shipped by a personality")
    return base


@pytest.mark.parametrize(
    ("path", "link"),
    [
        ("/usr/lib/personalities/web.raw", None),
        ("/var/../usr/lib/personalities/web.raw", None),
        ("/usr/lib/../lib/personalities/web.raw", None),
        ("/etc/personalities/web.raw", "/usr/lib/personalities/web.raw"),
        ("/etc/personalities/web.raw", "../../usr/lib/personalities/web.raw"),
    ],
)
def test_views_read_the_base_not_the_stack(
    root: Path, base: Path, path: str, link: str | None
) -> None:
    if link is not None:
        (root / "etc/personalities/web.raw").symlink_to(link)
    views = {"/usr": str(base)}
    result = open_trusted(str(root), path, views)
    assert result.logical_path == f"{root}/usr/lib/personalities/web.raw"
    assert read_all(result) == b"from the base"
    with pytest.raises(FileNotFoundError) as caught:
        open_trusted(str(root), "/usr/lib/personalities/evil.raw", views)
    assert caught.value.filename == f"{root}/usr/lib/personalities/evil.raw"


def test_view_is_entered_through_a_symlink_to_the_hierarchy(root: Path, base: Path) -> None:
    os.symlink("usr/lib", root / "lib")
    result = open_trusted(str(root), "/lib/personalities/web.raw", {"/usr/": str(base)})
    assert result.logical_path == f"{root}/usr/lib/personalities/web.raw"
    assert read_all(result) == b"from the base"


def test_view_directories_are_checked_like_the_others(root: Path, base: Path) -> None:
    os.chmod(base / "lib", 0o777)
    assert refusal(root, "/usr/lib/personalities/web.raw", views={"/usr": str(base)}) == (
        f"{root}/usr/lib is writable by others (mode 0777)"
    )


def test_a_view_needs_a_hierarchy_path(root: Path, base: Path) -> None:
    for bad in ("/", "usr", "/usr/../etc"):
        with pytest.raises(ValueError):
            open_trusted(str(root), "/usr/lib", {bad: str(base)}, want="dir")


def test_bad_arguments(root: Path) -> None:
    with pytest.raises(ValueError):
        open_trusted(str(root), "var/lib")
    for flags in (os.O_RDWR, os.O_WRONLY, os.O_RDONLY | os.O_CREAT, os.O_RDONLY | os.O_TRUNC):
        with pytest.raises(ValueError):
            open_trusted(str(root), "/var/lib/personalities/x.raw", flags=flags)


def test_trace_path_does_not_judge(root: Path) -> None:
    os.chmod(root / "var/lib", 0o777)
    (root / "etc/personalities").rmdir()
    os.symlink("../var/lib/personalities", root / "etc/personalities")
    with trace_path(str(root), "/etc/personalities") as trace:
        assert trace.logical_path == f"{root}/var/lib/personalities"
        assert trace.found is not None
        assert os.path.samestat(os.fstat(trace.found), os.stat(root / "var/lib/personalities"))
        looked_up = [(os.fstat(fd).st_ino, name) for fd, name in trace.lookups]
    assert looked_up == [
        (os.stat(root).st_ino, "etc"),
        (os.stat(root / "etc").st_ino, "personalities"),
        (os.stat(root).st_ino, "var"),  # `..` from etc/ back to root is no lookup
        (os.stat(root / "var").st_ino, "lib"),
        (os.stat(root / "var/lib").st_ino, "personalities"),
    ]
    with trace_path(str(root), "/run/personalities/more") as trace:
        assert trace.found is None
        assert [name for _, name in trace.lookups] == ["run", "personalities"]


SWAPPER = """
import os, sys
directory, name, first, second = sys.argv[1:5]
tmp = os.path.join(directory, ".swap")
targets = [first, second]
i = 0
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(targets[i % 2], tmp)
    os.rename(tmp, os.path.join(directory, name))
    i += 1
"""


Swapper = Callable[[Path, str, str, str], None]


@pytest.fixture
def swapper() -> Iterator[Swapper]:
    started: list[subprocess.Popen[str]] = []

    def start(directory: Path, name: str, first: str, second: str) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", SWAPPER, str(directory), name, first, second],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"

    yield start
    for process in started:
        process.kill()
        process.wait(60)
        if process.stdout is not None:
            process.stdout.close()


@pytest.mark.parametrize("where", ["entry", "directory"])
def test_swapped_symlink_never_opens_something_else(
    root: Path, swapper: Swapper, where: str
) -> None:
    """Another process swaps a symlink between a good and a bad target as fast as it can;
    every open either gets the good file (and says so) or refuses the bad one by name.
    A walk that checked one path and opened another would hand out the bad file."""
    good_dir = mkdirs(root / "var/lib/good")
    bad_dir = mkdirs(root / "var/lib/bad", 0o777)  # untrusted: anyone could have put this
    good = write(good_dir / "web.raw", b"good")
    bad = write(bad_dir / "web.raw", b"bad")
    if where == "entry":
        os.chown(bad, USER, USER)
        os.rename(bad, good_dir / "bad.raw")
        bad = good_dir / "bad.raw"
        swap_dir, swap_name, first, second = good_dir, "current.raw", "web.raw", "bad.raw"
        path = "/var/lib/good/current.raw"
    else:
        swap_dir, swap_name = root / "etc", "personalities.d"
        first, second = "../var/lib/good", "../var/lib/bad"
        path = "/etc/personalities.d/web.raw"
    good_id = (os.stat(good).st_dev, os.stat(good).st_ino)
    bad_id = (os.stat(bad).st_dev, os.stat(bad).st_ino)
    os.symlink(first, swap_dir / swap_name)
    swapper(swap_dir, swap_name, first, second)
    seen_good = seen_refused = 0
    attempts = 0
    while attempts < 2000 or not (seen_good and seen_refused):
        attempts += 1
        assert attempts < 200_000, "the swapper never showed both targets"
        try:
            result = open_trusted(str(root), path)
        except UntrustedPath as exc:
            assert str(bad) in str(exc) or str(bad_dir) in str(exc), exc
            seen_refused += 1
            continue
        identity = (os.fstat(result.fd).st_dev, os.fstat(result.fd).st_ino)
        content = read_all(result)
        assert identity != bad_id and content == b"good"
        assert identity == good_id
        assert result.logical_path == str(good)
        seen_good += 1

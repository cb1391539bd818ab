from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalityd.config import (
    KEYS,
    Config,
    build_config,
    drop_ins,
    load_config,
    read_config_sources,
)
from personalityd.core.errors import ConfigError
from personalityd.core.matching import DEFAULT_VOLUME_RULES, DEFAULT_WRITABLE_RULES

REPO = Path(__file__).resolve().parents[2]
ADMIN = "/etc/personalityd/personalityd.toml"


def test_defaults() -> None:
    config, warnings = build_config([], None)
    assert warnings == []
    assert config == Config()
    assert config.root == Path("/")
    assert config.mount_root == "/opt/personality"
    assert config.mount_options == ("ro", "nodev", "nosuid")
    assert config.volume_match == DEFAULT_VOLUME_RULES
    assert config.protected_paths == (
        "/etc/personalityd",
        "/usr/lib/personalityd",
        "/etc/os-release",
        "/usr/lib/os-release",
        "/etc/passwd",
        "/etc/shadow",
        "/etc/group",
        "/etc/gshadow",
        "/etc/sudoers",
        "/etc/sudoers.d",
    )
    assert config.hierarchies == ("/usr", "/etc")
    assert config.overlay_api == "auto"
    assert config.swap == "auto"
    assert config.max_layers == 500
    assert config.writable_match == DEFAULT_WRITABLE_RULES
    assert config.writable_fallback == "none"
    assert config.spool_dir == "/var/spool/personalityd"
    assert config.allowed_groups == ("personality",)
    assert config.state_dir == "/var/lib/personalityd"
    assert config.runtime_dir == "/run/personalityd"
    assert config.manage_services == "auto"
    assert config.block_signal is False


def test_every_key() -> None:
    data = tomllib.loads(
        """
root = "/srv/sandbox/"
[volumes]
mount_root = "/var/lib/personalities"
mount_options = ["ro", "nodev"]
match = [{ID_FS_LABEL = "p-*", ID_FS_TYPE = "erofs"}]
protected_paths = ["/etc//shadow", "/usr/lib/./os-release/", "/etc/shadow"]
[stack]
hierarchies = ["/usr", "/opt//tools/"]
overlay_api = "legacy"
swap = "replace"
max_layers = 20
[writable]
match = [{ID_PART_ENTRY_NAME = "data"}]
fallback = "tmpfs"
[spool]
dir = "/spool"
allowed_groups = ["wheel", "personality"]
[state]
dir = "/state"
runtime_dir = "/run/p"
[systemd]
manage_services = "no"
[debug]
block_signal = true
"""
    )
    config, warnings = build_config([(ADMIN, data)], None)
    assert warnings == []
    assert config.root == Path("/srv/sandbox")
    assert config.mount_root == "/var/lib/personalities"
    assert config.mount_options == ("ro", "nodev")
    assert [dict(r) for r in config.volume_match] == [{"ID_FS_LABEL": "p-*", "ID_FS_TYPE": "erofs"}]
    assert config.protected_paths == ("/etc/shadow", "/usr/lib/os-release")  # normalized, once
    assert config.hierarchies == ("/usr", "/opt/tools")
    assert (config.overlay_api, config.swap, config.max_layers) == ("legacy", "replace", 20)
    assert [dict(r) for r in config.writable_match] == [{"ID_PART_ENTRY_NAME": "data"}]
    assert config.writable_fallback == "tmpfs"
    assert config.allowed_groups == ("wheel", "personality")
    assert (config.spool_dir, config.state_dir, config.runtime_dir) == (
        "/spool",
        "/state",
        "/run/p",
    )
    assert config.manage_services == "no"
    assert config.block_signal is True
    assert config.path("/usr/bin") == Path("/srv/sandbox/usr/bin")
    assert config.path("/") == Path("/srv/sandbox")
    assert config.spool_path == Path("/srv/sandbox/spool")
    assert config.state_path == Path("/srv/sandbox/state")
    assert config.runtime_path == Path("/srv/sandbox/run/p")
    assert config.mount_root_path == Path("/srv/sandbox/var/lib/personalities")


def test_later_files_override_key_by_key_and_lists_replace() -> None:
    vendor = {"stack": {"hierarchies": ["/usr", "/etc", "/opt"], "swap": "beneath"}}
    admin = {"stack": {"hierarchies": ["/usr"]}, "spool": {"dir": "/a"}}
    dropin = {"stack": {"max_layers": 3}, "spool": {"dir": "/b"}}
    config, _ = build_config([("v", vendor), ("a", admin), ("d", dropin)], None)
    assert config.hierarchies == ("/usr",)
    assert config.swap == "beneath"
    assert config.max_layers == 3
    assert config.spool_dir == "/b"


def test_root_override() -> None:
    config, _ = build_config([(ADMIN, {"root": "/x"})], "/tmp/sandbox/")
    assert config.root == Path("/tmp/sandbox")
    with pytest.raises(ConfigError, match="--root"):
        build_config([], "relative/dir")


@pytest.mark.parametrize(
    ("data", "warning"),
    [
        ({"stack": {"hierachies": ["/usr"]}}, f"{ADMIN}: unknown key 'stack.hierachies'"),
        ({"colour": "red"}, f"{ADMIN}: unknown key 'colour'"),
        ({"spool": {"dir": "/s", "mode": 7}}, f"{ADMIN}: unknown key 'spool.mode'"),
    ],
)
def test_unknown_keys_warn(data: dict[str, Any], warning: str) -> None:
    _, warnings = build_config([(ADMIN, data)], None)
    assert warnings == [warning]


BAD: list[tuple[str, object, str]] = [
    # (dotted key, bad value, expected form that the message must name)
    ("root", "relative", "an absolute path"),
    ("root", 1, "an absolute path"),
    ("root", "/a/../b", "without '..'"),
    ("volumes.mount_root", "/", "an absolute path other than /"),
    ("volumes.mount_root", "opt", "an absolute path"),
    ("volumes.mount_options", ["ro", "rw"], "without 'rw'"),
    ("volumes.mount_options", ["ro,rw"], "one per item"),
    ("volumes.mount_options", "ro", "a list of mount options"),
    ("volumes.mount_options", [1], "a list of mount options"),
    ("volumes.match", {"ID_FS_TYPE": "erofs"}, "a list of tables"),
    ("volumes.match", [{"ID_FS_TYPE": 1}], "a list of tables"),
    ("volumes.match", [{}], "none empty"),
    ("volumes.match", ["squashfs"], "a list of tables"),
    ("volumes.protected_paths", "/etc/passwd", "a list of absolute paths"),
    ("volumes.protected_paths", ["etc/passwd"], "a list of absolute paths"),
    ("volumes.protected_paths", ["/"], "other than /"),
    ("volumes.protected_paths", ["//"], "other than /"),
    ("volumes.protected_paths", ["/etc/../shadow"], "without '..'"),
    ("volumes.protected_paths", [1], "a list of absolute paths"),
    ("stack.hierarchies", "usr", "a list of absolute paths"),
    ("stack.hierarchies", ["usr"], "a list of absolute paths"),
    ("stack.hierarchies", ["/"], "other than /"),
    ("stack.hierarchies", ["/usr", "/usr/local"], "neither repeat nor nest"),
    ("stack.hierarchies", ["/usr", "/usr/"], "neither repeat nor nest"),
    ("stack.hierarchies", ["/usr/../etc"], "without '..'"),
    ("stack.overlay_api", "lowerdir", 'one of "auto", "lowerdir+", "legacy"'),
    ("stack.swap", "under", 'one of "auto", "beneath", "replace"'),
    ("stack.max_layers", 0, "an integer from 1 to 500"),
    ("stack.max_layers", 501, "an integer from 1 to 500"),
    ("stack.max_layers", True, "an integer from 1 to 500"),
    ("stack.max_layers", "5", "an integer from 1 to 500"),
    ("state.history", 1, "an integer from 2 to 10000"),
    ("transactions.confirm_timeout", -1, "an integer from 0 to 4294967295"),
    ("transactions.confirm_timeout", 2.5, "an integer from 0 to 4294967295"),
    ("writable.match", [{"ID_FS_LABEL": ["a"]}], "a list of tables"),
    ("writable.fallback", "ramfs", 'one of "none", "tmpfs"'),
    ("writable.fallback", False, 'one of "none", "tmpfs"'),
    ("spool.dir", "spool", "an absolute path"),
    ("spool.allowed_groups", "personality", "a list of group names"),
    ("spool.allowed_groups", [""], "a list of group names"),
    ("spool.allowed_groups", ["a b"], "a list of group names"),
    ("state.dir", ["/x"], "an absolute path"),
    ("state.runtime_dir", "", "an absolute path"),
    ("systemd.manage_services", True, 'one of "auto", "yes", "no"'),
    ("debug.block_signal", "yes", "true or false"),
    ("images.search_paths", "/srv/images", "a list of absolute paths"),
    ("images.search_paths", ["images"], "a list of absolute paths"),
    ("images.sysext_paths", "yes", "true or false"),
    ("images.verify", "gpg", 'one of "none", "checksum", "signed"'),
]


def nest(dotted: str, value: object) -> dict[str, Any]:
    table, _, key = dotted.rpartition(".")
    return {table: {key: value}} if table else {key: value}


@pytest.mark.parametrize(("key", "value", "expected"), BAD)
def test_bad_values(key: str, value: object, expected: str) -> None:
    drop_in = "/etc/personalityd/personalityd.toml.d/50-x.toml"
    with pytest.raises(ConfigError) as info:
        build_config([(ADMIN, {}), (drop_in, nest(key, value))], None)
    message = str(info.value)
    assert message.startswith(f"{drop_in}: {key} must be ")
    assert expected in message
    assert "got " in message


def test_message_example() -> None:
    with pytest.raises(ConfigError) as info:
        build_config([(ADMIN, {"stack": {"hierarchies": ["usr"]}})], None)
    assert (
        str(info.value) == f"{ADMIN}: stack.hierarchies must be a list of absolute paths, got 'usr'"
    )


def test_protected_paths_may_be_emptied() -> None:
    config, _ = build_config([(ADMIN, {"volumes": {"protected_paths": []}})], None)
    assert config.protected_paths == ()


def test_a_bad_value_overridden_later_is_fine() -> None:
    config, _ = build_config(
        [("a", {"stack": {"swap": "bad"}}), ("b", {"stack": {"swap": "beneath"}})], None
    )
    assert config.swap == "beneath"


def test_a_table_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match=f"^{ADMIN}: stack must be a table, got 'x'$"):
        build_config([(ADMIN, {"stack": "x"})], None)


@pytest.mark.parametrize(
    ("data", "blamed"),
    [
        ({"stack": {"hierarchies": ["/opt"]}}, f"{ADMIN}: stack.hierarchies"),
        ({"stack": {"hierarchies": ["/opt/personality"]}}, f"{ADMIN}: stack.hierarchies"),
        ({"volumes": {"mount_root": "/usr/personality"}}, f"{ADMIN}: volumes.mount_root"),
        ({"volumes": {"mount_root": "/etc"}}, f"{ADMIN}: volumes.mount_root"),
        (
            {"volumes": {"mount_root": "/srv/p"}, "stack": {"hierarchies": ["/srv/p/usr"]}},
            f"{ADMIN}: stack.hierarchies",
        ),
    ],
)
def test_hierarchies_and_mount_root_must_not_overlap(data: dict[str, Any], blamed: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config([(ADMIN, data)], None)
    assert str(info.value).startswith(blamed)
    assert "must not contain one another" in str(info.value)


# Wrong values by type: whatever hypothesis draws from these must be refused for the key.
PATHS_BAD = st.one_of(
    st.text().filter(lambda s: not s.startswith("/")),
    st.integers(),
    st.booleans(),
    st.lists(st.text(), max_size=2),
    st.text().map(lambda s: "/" + s + "/../x"),
)
LIST_BAD = st.one_of(
    st.text(), st.integers(), st.booleans(), st.lists(st.integers(), min_size=1, max_size=3)
)
CHOICE_BAD = st.one_of(st.text(), st.integers(), st.booleans())
BAD_STRATEGIES: dict[str, st.SearchStrategy[object]] = {
    "root": PATHS_BAD,
    "volumes.mount_root": PATHS_BAD | st.just("/"),
    "volumes.mount_options": LIST_BAD | st.lists(st.just("rw"), min_size=1, max_size=2),
    "volumes.match": LIST_BAD | st.lists(st.just({}), min_size=1, max_size=2),
    "volumes.protected_paths": LIST_BAD | PATHS_BAD.map(lambda p: [p]) | st.just(["/"]),
    "stack.hierarchies": LIST_BAD | PATHS_BAD.map(lambda p: [p]),
    "stack.overlay_api": CHOICE_BAD.filter(lambda v: v not in ("auto", "lowerdir+", "legacy")),
    "stack.swap": CHOICE_BAD.filter(lambda v: v not in ("auto", "beneath", "replace")),
    "stack.max_layers": st.integers().filter(lambda i: not 1 <= i <= 500)
    | st.text()
    | st.booleans()
    | st.floats(),
    "state.history": st.integers().filter(lambda i: not 2 <= i <= 10_000) | st.booleans(),
    "transactions.confirm_timeout": st.integers(max_value=-1) | st.text() | st.floats(),
    "writable.match": LIST_BAD | st.lists(st.just({"A": 1}), min_size=1, max_size=2),
    "writable.fallback": CHOICE_BAD.filter(lambda v: v not in ("none", "tmpfs")),
    "spool.dir": PATHS_BAD,
    "spool.allowed_groups": LIST_BAD | st.lists(st.just(""), min_size=1, max_size=2),
    "state.dir": PATHS_BAD,
    "state.runtime_dir": PATHS_BAD,
    "systemd.manage_services": CHOICE_BAD.filter(lambda v: v not in ("auto", "yes", "no")),
    "debug.block_signal": st.text() | st.integers() | st.lists(st.booleans(), max_size=2),
    "images.search_paths": LIST_BAD | PATHS_BAD.map(lambda p: [p]) | st.just(["/"]),
    "images.sysext_paths": st.text() | st.integers() | st.lists(st.booleans(), max_size=2),
    "images.verify": CHOICE_BAD.filter(lambda v: v not in ("none", "checksum", "signed")),
}


def test_every_key_has_a_bad_value_strategy() -> None:
    assert set(BAD_STRATEGIES) == set(KEYS)


@given(st.data())
def test_every_bad_value_names_file_and_key(data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(BAD_STRATEGIES)))
    value = data.draw(BAD_STRATEGIES[key])
    file = data.draw(st.sampled_from([ADMIN, "/usr/lib/personalityd/personalityd.toml"]))
    with pytest.raises(ConfigError) as info:
        build_config([("first.toml", {"spool": {"dir": "/s"}}), (file, nest(key, value))], None)
    assert str(info.value).startswith(f"{file}: {key} must be ")


# --- reading the files ---


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_load_config_precedence(tmp_path: Path) -> None:
    vendor = write(tmp_path / "vendor.toml", '[stack]\nswap = "beneath"\nmax_layers = 7\n')
    admin = write(tmp_path / "etc/p.toml", "[stack]\nmax_layers = 8\n")
    write(tmp_path / "etc/p.toml.d/20-b.toml", "[stack]\nmax_layers = 20\n")
    write(tmp_path / "etc/p.toml.d/10-a.toml", '[stack]\nmax_layers = 10\nswap = "replace"\n')
    write(tmp_path / "etc/p.toml.d/.hidden.toml", "[stack]\nmax_layers = 99\n")
    write(tmp_path / "etc/p.toml.d/ignored.conf", "[stack]\nmax_layers = 98\n")
    (tmp_path / "etc/p.toml.d/dir.toml").mkdir()
    config, warnings = load_config(None, None, vendor=vendor, admin=admin)
    assert warnings == []
    assert config.max_layers == 20
    assert config.swap == "replace"
    assert drop_ins(admin) == [
        str(tmp_path / "etc/p.toml.d/10-a.toml"),
        str(tmp_path / "etc/p.toml.d/20-b.toml"),
    ]


def test_load_config_missing_files_are_fine(tmp_path: Path) -> None:
    config, warnings = load_config(
        None, None, vendor=str(tmp_path / "no/v.toml"), admin=str(tmp_path / "no/a.toml")
    )
    assert config == Config()
    assert warnings == []


def test_config_option_replaces_admin_file_but_keeps_drop_ins(tmp_path: Path) -> None:
    admin = write(tmp_path / "etc/p.toml", "[stack]\nmax_layers = 8\nswap = 'beneath'\n")
    write(tmp_path / "etc/p.toml.d/10-a.toml", "[stack]\nmax_layers = 10\n")
    mine = write(tmp_path / "mine.toml", "[stack]\nmax_layers = 3\noverlay_api = 'legacy'\n")
    config, _ = load_config(mine, None, vendor=str(tmp_path / "none.toml"), admin=admin)
    assert config.max_layers == 10
    assert config.overlay_api == "legacy"
    assert config.swap == "auto"  # the admin file was not read


def test_missing_config_option_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=f"^{missing}: no such file$"):
        load_config(missing, None, vendor=str(tmp_path / "v"), admin=str(tmp_path / "a"))


def test_bad_toml_names_file(tmp_path: Path) -> None:
    admin = write(tmp_path / "a.toml", "[stack\n")
    with pytest.raises(ConfigError) as info:
        load_config(None, None, vendor=str(tmp_path / "v"), admin=admin)
    assert str(info.value).startswith(f"{admin}: invalid TOML: ")


def test_not_utf8_names_file(tmp_path: Path) -> None:
    admin = tmp_path / "a.toml"
    admin.write_bytes(b'root = "\xff"\n')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(None, None, vendor=str(tmp_path / "v"), admin=str(admin))


def test_unknown_key_warning_names_drop_in(tmp_path: Path) -> None:
    admin = str(tmp_path / "a.toml")
    dropin = write(tmp_path / "a.toml.d/x.toml", "[stack]\nhierachies = ['/usr']\n")
    _, warnings = load_config(None, None, vendor=str(tmp_path / "v"), admin=admin)
    assert warnings == [f"{dropin}: unknown key 'stack.hierachies'"]


def test_relative_root_override_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config, _ = load_config(None, "sandbox", vendor=str(tmp_path / "v"), admin=str(tmp_path / "a"))
    assert config.root == tmp_path / "sandbox"


def test_root_option_moves_the_files_under_it(tmp_path: Path) -> None:
    root = tmp_path / "sandbox"
    vendor = "[stack]\nmax_layers = 7\nswap = 'beneath'\n"
    write(root / "usr/lib/personalityd/personalityd.toml", vendor)
    write(root / "etc/personalityd/personalityd.toml", "[stack]\nmax_layers = 8\n")
    write(root / "etc/personalityd/personalityd.toml.d/50-x.toml", "[spool]\ndir = '/s'\n")
    config, warnings = load_config(None, str(root))
    assert warnings == []
    assert (config.max_layers, config.swap, config.spool_dir) == (8, "beneath", "/s")
    assert config.root == root
    sources = read_config_sources(None, str(root))
    assert [path for path, _ in sources] == [
        str(root / "usr/lib/personalityd/personalityd.toml"),
        str(root / "etc/personalityd/personalityd.toml"),
        str(root / "etc/personalityd/personalityd.toml.d/50-x.toml"),
    ]


def test_root_option_with_config_option_keeps_the_drop_ins_under_root(tmp_path: Path) -> None:
    root = tmp_path / "sandbox"
    write(root / "etc/personalityd/personalityd.toml", "[stack]\nmax_layers = 8\n")
    write(root / "etc/personalityd/personalityd.toml.d/50-x.toml", "[stack]\nswap = 'replace'\n")
    mine = write(tmp_path / "mine.toml", "[stack]\nmax_layers = 3\n")
    config, _ = load_config(mine, str(root))
    assert (config.max_layers, config.swap) == (3, "replace")


def test_root_key_does_not_move_the_files(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "etc/personalityd/personalityd.toml.d/50-x.toml", "[stack]\nmax_layers = 9\n")
    admin = write(tmp_path / "a.toml", f"root = '{elsewhere}'\n")
    config, _ = load_config(None, None, vendor=str(tmp_path / "v"), admin=admin)
    assert config.root == elsewhere
    assert config.max_layers == 500


def test_shipped_config_is_all_defaults_and_every_key() -> None:
    shipped = REPO / "config" / "personalityd.toml"
    text = shipped.read_text()
    assert tomllib.loads(text) == {
        "volumes": {},
        "images": {},
        "stack": {},
        "writable": {},
        "spool": {},
        "state": {},
        "transactions": {},
        "systemd": {},
        "debug": {},
    }
    # Uncommented, it is the defaults, key for key.
    # "#key = ...", "#    { ... },", "#    \"/a/path\"," and "#]"
    setting = re.compile(r"#(?=[A-Za-z_\]]|\s+\{|\s{4}\")")
    uncommented = "\n".join(line[1:] if setting.match(line) else line for line in text.splitlines())
    data = tomllib.loads(uncommented)
    config, warnings = build_config([(str(shipped), data)], None)
    assert warnings == []
    assert config == Config()
    assert {f"{t}.{k}" for t, v in data.items() if isinstance(v, dict) for k in v} | {
        k for k, v in data.items() if not isinstance(v, dict)
    } == set(KEYS)

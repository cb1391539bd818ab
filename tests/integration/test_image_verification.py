"""`images.verify` end to end: image files checked against SHA256SUMS (and its signature,
with gpgv and a real key made for the test) before they are attached. A file that fails is
listed `failed`, the reason journalled, and never attached; one replaced after it was checked
is checked again, from the very file that is attached.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from image_entries import install, search_dir
from sandbox_view import REFUSED, Images, ok, read, wait_until

from testkit.daemon import Daemon
from testkit.journal import JournalReader
from testkit.signing import Key, agents_of, make_key, write_sha256sums

WEB = {"usr/bin/web-tool": "web\n"}


@pytest.fixture
def key(tmp_path: Path) -> Iterator[Key]:
    made = make_key(tmp_path / "gnupg")
    yield made
    assert agents_of(made.home) == set()


def keyring(root: Path, key: Key) -> None:
    path = root / "etc/personalityd/import-pubring.pgp"
    path.parent.mkdir(parents=True, exist_ok=True)
    key.export_public(path)
    os.chmod(path, 0o644)


def state_of(daemon: Daemon, name: str) -> str:
    """ "found" or "failed", as the daemon's last look at the entry of `name` logged it."""
    for line in reversed(daemon.log_text().splitlines()):
        if "event=image_found" in line and f"name={name} " in line:
            return "found" if re.search(r"failed=(\s|$)", line) else "failed"
    return ""


def failure(daemon: Daemon, name: str) -> dict[str, object]:
    result = daemon.request({"action": "attach", "personality": name})
    assert result["_dir"] == "failed", result
    return result


def test_checksum_mode(
    daemon: Daemon, image: Images, sandbox_root: Path, journal: JournalReader
) -> None:
    directory = search_dir(sandbox_root)
    install(image("good", WEB), directory, "good.raw")
    install(image("bad", WEB), directory, "bad.raw")
    install(image("absent", WEB), directory, "absent.raw")
    write_sha256sums(directory, ["good.raw", "bad.raw"])
    with open(directory / "bad.raw", "r+b") as f:  # one byte changed after listing
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    tree = directory / "tree"
    tree.mkdir()
    daemon.update_config({"images": {"verify": "checksum"}})
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "good"}))
    assert read(sandbox_root, "usr/bin/web-tool") == b"web\n"
    assert "does not match" in str(failure(daemon, "bad")["message"])
    assert "not listed" in str(failure(daemon, "absent")["message"])
    reasons = [e["PERSONALITY_REASON"] for e in journal.entries(REFUSED, min_count=2)]
    assert any("bad.raw does not match" in r for r in reasons), reasons
    assert any("absent.raw is not listed" in r for r in reasons), reasons
    assert "cannot be verified" in str(failure(daemon, "tree")["message"])


def test_signed_mode(
    daemon: Daemon, image: Images, sandbox_root: Path, key: Key, tmp_path: Path
) -> None:
    keyring(sandbox_root, key)
    good_dir = search_dir(sandbox_root)
    install(image("good", WEB), good_dir, "good.raw")
    write_sha256sums(good_dir, ["good.raw"])
    key.sign_sha256sums(good_dir)
    # Signed by a key that is not in the keyring.
    stranger = make_key(tmp_path / "stranger", "stranger")
    other_dir = search_dir(sandbox_root, "/run/personalities")
    install(image("other", WEB), other_dir, "other.raw")
    write_sha256sums(other_dir, ["other.raw"])
    stranger.sign_sha256sums(other_dir)
    # Changed after signing.
    late_dir = search_dir(sandbox_root, "/etc/personalities")
    install(image("late", WEB), late_dir, "late.raw")
    write_sha256sums(late_dir, ["late.raw"])
    key.sign_sha256sums(late_dir)
    with open(late_dir / "SHA256SUMS", "a") as f:
        f.write("0" * 64 + "  extra.raw\n")
    daemon.update_config({"images": {"verify": "signed"}})
    daemon.start()
    ok(daemon.request({"action": "attach", "personality": "good"}))
    assert "does not verify" in str(failure(daemon, "other")["message"])
    assert "does not verify" in str(failure(daemon, "late")["message"])
    assert agents_of(stranger.home) == set()


def test_a_file_replaced_after_its_check_is_checked_again(
    daemon: Daemon, image: Images, sandbox_root: Path
) -> None:
    directory = search_dir(sandbox_root)
    install(image("web", WEB), directory, "web.raw")
    write_sha256sums(directory, ["web.raw"])
    daemon.update_config({"images": {"verify": "checksum"}})
    daemon.start()
    wait_until(lambda: state_of(daemon, "web") == "found", daemon)
    # Renamed over the entry after the daemon read SHA256SUMS and found it good: the attach
    # opens, digests and attaches that one file, which the listing does not vouch for.
    install(image("web", {"usr/bin/web-tool": "evil\n"}), directory, "web.raw")
    result = daemon.request({"action": "attach", "personality": "web"})
    assert result["_dir"] == "failed", result
    assert not (sandbox_root / "usr/bin/web-tool").exists()

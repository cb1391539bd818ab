"""adapters/verify.py with real keys, gpgv, gpg and sha256sum: what `images.verify` passes and
what it refuses, with which message.

Every test runs with its own temporary directory for tempfile (checked empty afterwards: no
gpgv home is left behind) and every key's gpg-agent is checked to be gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from personalityd.adapters import verify
from personalityd.adapters.verify import (
    VerificationFailed,
    check_listed,
    check_signature,
    file_digest,
    find_keyring,
    missing_keyring_message,
)
from personalityd.core.sha256sums import format_sha256sums, parse_sha256sums
from testkit.polling import wait_for
from testkit.signing import Key, agents_of, make_key, write_sha256sums

EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
# Larger than verify.READ_SIZE and not a multiple of it: the digest takes several reads.
IMAGE_SIZE = 2 * verify.READ_SIZE + 12345


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    directory = tmp_path / "tempfile"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    yield directory
    assert sorted(os.listdir(directory)) == [], "a gpgv home was left behind"


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[list[Key]]:
    """Keys the test makes (`make`); after the test, none of their agents may be running."""
    made: list[Key] = []
    yield made
    for key in made:
        wait_until_no_agent(key.home)


def wait_until_no_agent(home: Path) -> None:
    wait_for(lambda: not agents_of(home), 30, f"the gpg-agent of {home} to exit")


def new_key(keys: list[Key], tmp_path: Path, name: str = "personalityd test", **kw: bool) -> Key:
    key = make_key(tmp_path / f"gnupg{len(keys)}", name, **kw)
    keys.append(key)
    return key


@pytest.fixture
def key(keys: list[Key], tmp_path: Path) -> Key:
    return new_key(keys, tmp_path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A directory with web.raw (random bytes) and db.raw, and a SHA256SUMS listing both."""
    directory = tmp_path / "images"
    directory.mkdir()
    (directory / "web.raw").write_bytes(os.urandom(IMAGE_SIZE))
    (directory / "db.raw").write_bytes(b"db\n")
    write_sha256sums(directory, ["web.raw", "db.raw"])
    return directory


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    (path / "etc/personalityd").mkdir(parents=True)
    (path / "usr/lib/personalityd").mkdir(parents=True)
    return path


def digest_of(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return file_digest(fd)
    finally:
        os.close(fd)


def sha256sum(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, check=True, text=True
                          ).stdout.split()[0]  # fmt: skip


def sums_of(directory: Path) -> bytes:
    return (directory / "SHA256SUMS").read_bytes()


def signature_of(directory: Path) -> bytes:
    return (directory / "SHA256SUMS.gpg").read_bytes()


def keyring_for(key: Key, root: Path) -> str:
    key.export_public(root / "etc/personalityd/import-pubring.pgp")
    keyring = find_keyring(root)
    assert keyring == str(root / "etc/personalityd/import-pubring.pgp")
    return keyring


# file_digest


def test_file_digest_is_sha256sum_and_leaves_the_offset(images: Path) -> None:
    fd = os.open(images / "web.raw", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        assert file_digest(fd) == sha256sum(images / "web.raw")
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1000
    finally:
        os.close(fd)


def test_file_digest_of_an_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert digest_of(tmp_path / "empty") == EMPTY_DIGEST


def test_file_digest_raises_oserror_for_what_cannot_be_read(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError):
            file_digest(read_end)  # a pipe has no offsets to pread at
    finally:
        os.close(read_end)
        os.close(write_end)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError):
            file_digest(fd)
    finally:
        os.close(fd)


# check_listed


def test_a_listed_file_passes(images: Path) -> None:
    check_listed(digest_of(images / "web.raw"), sums_of(images), ["web.raw"], str(images))
    check_listed(digest_of(images / "db.raw"), sums_of(images), ["db.raw"], str(images))


def test_one_byte_changed_fails_naming_the_file(images: Path) -> None:
    listed = sha256sum(images / "web.raw")
    with open(images / "web.raw", "r+b") as image:
        image.seek(IMAGE_SIZE // 2)
        byte = image.read(1)
        image.seek(IMAGE_SIZE // 2)
        image.write(bytes([byte[0] ^ 1]))
    actual = digest_of(images / "web.raw")
    with pytest.raises(VerificationFailed) as failed:
        check_listed(actual, sums_of(images), ["web.raw"], str(images))
    assert str(failed.value) == (
        f"web.raw does not match its digest in {images}/SHA256SUMS "
        f"(listed {listed[:16]}…, the file has {actual[:16]}…)"
    )


def test_a_file_missing_from_the_listing_fails(images: Path) -> None:
    (images / "new.raw").write_bytes(b"new")
    with pytest.raises(VerificationFailed) as failed:
        check_listed(digest_of(images / "new.raw"), sums_of(images), ["new.raw"], str(images))
    assert str(failed.value) == f"new.raw is not listed in {images}/SHA256SUMS"
    with pytest.raises(VerificationFailed) as failed:
        check_listed(EMPTY_DIGEST, sums_of(images), ["new.raw", "new_1.raw"], str(images))
    assert str(failed.value) == f"new.raw or new_1.raw is not listed in {images}/SHA256SUMS"


def test_a_symlink_entry_passes_by_its_target_name(images: Path) -> None:
    """The sysupdate convention: web.raw -> web_1.2.raw, and SHA256SUMS lists web_1.2.raw."""
    (images / "web_1.2.raw").write_bytes(b"version 1.2")
    (images / "web.link").symlink_to("web_1.2.raw")
    write_sha256sums(images, ["web_1.2.raw"])
    digest = digest_of(images / "web.link")
    check_listed(digest, sums_of(images), ["web.link", "web_1.2.raw"], str(images))


def test_an_unreadable_listing_fails_naming_it_and_the_line(images: Path) -> None:
    sums = sums_of(images) + b"SHA256 (x.raw) = " + EMPTY_DIGEST.encode() + b"\n"
    with pytest.raises(VerificationFailed) as failed:
        check_listed(digest_of(images / "web.raw"), sums, ["web.raw"], str(images))
    assert str(failed.value).startswith(f"{images}/SHA256SUMS, line 3: BSD-style line")


def test_check_listed_refuses_what_is_not_a_digest(images: Path) -> None:
    with pytest.raises(ValueError, match="not a lowercase SHA-256 hex digest"):
        check_listed(EMPTY_DIGEST.upper(), sums_of(images), ["web.raw"], str(images))
    with pytest.raises(ValueError, match="at least one name"):
        check_listed(EMPTY_DIGEST, sums_of(images), [], str(images))


def test_the_digest_comes_from_the_descriptor_not_the_path(images: Path) -> None:
    """An image renamed over the entry after it was opened: the open descriptor still
    verifies as the file it was, and a fresh open (the new file) fails."""
    sums = sums_of(images)
    fd = os.open(images / "web.raw", os.O_RDONLY | os.O_CLOEXEC)
    try:
        (images / "web.raw.new").write_bytes(os.urandom(1000))
        os.rename(images / "web.raw.new", images / "web.raw")
        check_listed(file_digest(fd), sums, ["web.raw"], str(images))
    finally:
        os.close(fd)
    with pytest.raises(VerificationFailed, match=r"^web\.raw does not match its digest"):
        check_listed(digest_of(images / "web.raw"), sums, ["web.raw"], str(images))


# check_signature


def test_a_good_signature_passes(images: Path, key: Key, root: Path) -> None:
    key.sign_sha256sums(images)
    keyring = keyring_for(key, root)
    check_signature(sums_of(images), signature_of(images), keyring, str(images))
    check_listed(digest_of(images / "web.raw"), sums_of(images), ["web.raw"], str(images))


def test_an_armored_signature_passes(images: Path, key: Key, root: Path) -> None:
    key.sign_sha256sums(images, armor=True)
    assert signature_of(images).startswith(b"-----BEGIN PGP SIGNATURE-----")
    check_signature(sums_of(images), signature_of(images), keyring_for(key, root), str(images))


@pytest.mark.parametrize("form", ["binary", "armored", "keybox"])
def test_keyring_forms(images: Path, key: Key, root: Path, form: str) -> None:
    """`gpg --export` (binary), `gpg --export --armor` (turned binary with gpg --dearmor
    first) and a GnuPG keybox (pubring.kbx) all work as the keyring."""
    key.sign_sha256sums(images)
    keyring = root / "etc/personalityd/import-pubring.pgp"
    if form == "keybox":
        shutil.copyfile(key.home / "pubring.kbx", keyring)
    else:
        key.export_public(keyring, armor=form == "armored")
    check_signature(sums_of(images), signature_of(images), str(keyring), str(images))


def test_gpgv_itself_refuses_an_armored_keyring(images: Path, key: Key, tmp_path: Path) -> None:
    """Why check_signature dearmors: gpgv 2.2 given an armored keyring finds no key in it."""
    key.sign_sha256sums(images)
    armored = key.export_public(tmp_path / "armored.asc", armor=True)
    home = tmp_path / "gpgv-home"
    home.mkdir(mode=0o700)
    proc = subprocess.run(
        ["gpgv", "--homedir", str(home), "--keyring", str(armored),
         str(images / "SHA256SUMS.gpg"), str(images / "SHA256SUMS")],
        capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "No public key" in proc.stderr


def test_a_key_not_in_the_keyring_fails(
    images: Path, key: Key, keys: list[Key], tmp_path: Path, root: Path
) -> None:
    stranger = new_key(keys, tmp_path, "stranger")
    stranger.sign_sha256sums(images)
    keyring = keyring_for(key, root)
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring, str(images))
    assert str(failed.value) == (
        f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: it is signed by key "
        f"{stranger.fingerprint[-16:]}, which is not in the keyring {keyring}"
    )


def test_sha256sums_changed_after_signing_fails(images: Path, key: Key, root: Path) -> None:
    key.sign_sha256sums(images)
    (images / "new.raw").write_bytes(b"smuggled in")
    write_sha256sums(images, ["web.raw", "db.raw", "new.raw"])
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring_for(key, root), str(images))
    assert str(failed.value) == (
        f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: bad signature by "
        f"personalityd test (key {key.fingerprint[-16:]}): SHA256SUMS was changed after it "
        "was signed, or the signature was made for another file"
    )


def test_what_gpgv_checks_is_the_bytes_given(images: Path, key: Key, root: Path) -> None:
    """The listing the caller read (and parses) is what is checked, whatever the file on
    disk says by the time gpgv runs."""
    key.sign_sha256sums(images)
    read_before = sums_of(images)
    (images / "SHA256SUMS").write_bytes(b"changed on disk\n")
    keyring = keyring_for(key, root)
    check_signature(read_before, signature_of(images), keyring, str(images))
    with pytest.raises(VerificationFailed, match="bad signature"):
        check_signature(sums_of(images), signature_of(images), keyring, str(images))


def test_missing_signature_bytes_fail(images: Path, key: Key, root: Path) -> None:
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), b"", keyring_for(key, root), str(images))
    assert str(failed.value) == f"{images}/SHA256SUMS.gpg is empty"


def test_a_binary_garbage_signature_fails(images: Path, key: Key, root: Path) -> None:
    garbage = b"\x89" + os.urandom(200)  # looks like the start of an OpenPGP packet
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), garbage, keyring_for(key, root), str(images))
    assert str(failed.value).startswith(f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: ")


def test_text_garbage_is_no_openpgp_data(images: Path, key: Key, root: Path) -> None:
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), b"garbage\n", keyring_for(key, root), str(images))
    assert str(failed.value) == (
        f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: it holds no valid OpenPGP data"
    )


def test_a_signature_with_the_data_inside_fails(images: Path, key: Key, root: Path) -> None:
    """`gpg --sign` of any file (even SHA256SUMS itself) is no detached signature."""
    key.sign_attached(images / "SHA256SUMS", images / "SHA256SUMS.gpg")
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring_for(key, root), str(images))
    assert str(failed.value) == (
        f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: not a detached signature"
    )


def test_a_signature_by_an_expired_key_fails(
    images: Path, keys: list[Key], tmp_path: Path, root: Path
) -> None:
    """gpgv exits 0 here (EXPKEYSIG with VALIDSIG): only the missing GOODSIG tells."""
    old = new_key(keys, tmp_path, "old key", expired=True)
    old.sign_sha256sums(images)
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring_for(old, root), str(images))
    assert str(failed.value) == (
        f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: signed by old key "
        f"(key {old.fingerprint[-16:]}), whose key has expired"
    )


def test_a_signature_by_a_revoked_key_fails(images: Path, key: Key, root: Path) -> None:
    """gpgv exits 0 here too (REVKEYSIG with VALIDSIG)."""
    key.sign_sha256sums(images)
    key.revoke()
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring_for(key, root), str(images))
    assert str(failed.value) == (
        f"{images}/SHA256SUMS.gpg does not verify SHA256SUMS: signed by personalityd test "
        f"(key {key.fingerprint[-16:]}), whose key has been revoked"
    )


def test_keyring_that_is_missing_empty_or_not_openpgp(
    images: Path, key: Key, tmp_path: Path
) -> None:
    key.sign_sha256sums(images)
    sums, signature = sums_of(images), signature_of(images)
    missing = tmp_path / "missing.pgp"
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums, signature, str(missing), str(images))
    assert str(failed.value) == f"cannot read the keyring {missing}: No such file or directory"
    empty = tmp_path / "empty.pgp"
    empty.write_bytes(b"\n")
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums, signature, str(empty), str(images))
    assert str(failed.value) == f"the keyring {empty} is empty"
    text = tmp_path / "text.pgp"
    text.write_text("not a key\n")
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums, signature, str(text), str(images))
    assert str(failed.value) == (
        f"the keyring {text} is not valid ASCII-armored OpenPGP: no valid OpenPGP data found."
    )
    fifo = tmp_path / "fifo.pgp"
    os.mkfifo(fifo)
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums, signature, str(fifo), str(images))
    assert str(failed.value) == f"the keyring {fifo} is not a regular file"


def only_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *programs: str) -> None:
    """PATH holding only `programs` (symlinks to the real ones), as on a host without the
    others installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in programs:
        real = shutil.which(program)
        assert real is not None, program
        (bin_dir / program).symlink_to(real)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_without_gpgv(
    images: Path, key: Key, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key.sign_sha256sums(images)
    keyring = keyring_for(key, root)
    only_on_path(tmp_path, monkeypatch, "gpg")
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring, str(images))
    assert str(failed.value) == (
        f"cannot check {images}/SHA256SUMS.gpg: gpgv (package gpgv) is not installed, and "
        'images.verify = "signed" needs it'
    )


def test_armored_keyring_without_gpg(
    images: Path, key: Key, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpgv alone (no gnupg package): a binary keyring works, an armored one is refused with
    what to do."""
    key.sign_sha256sums(images)
    binary = key.export_public(root / "etc/personalityd/import-pubring.pgp")
    armored = key.export_public(tmp_path / "armored.asc", armor=True)
    only_on_path(tmp_path, monkeypatch, "gpgv")
    check_signature(sums_of(images), signature_of(images), str(binary), str(images))
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), str(armored), str(images))
    assert "is ASCII-armored" in str(failed.value)
    assert "needs gpg (package gnupg)" in str(failed.value)


def test_a_gpgv_that_hangs_is_stopped(
    images: Path, key: Key, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gpgv that never answers (here: one that sleeps) is killed at the timeout."""
    key.sign_sha256sums(images)
    keyring = keyring_for(key, root)
    bin_dir = tmp_path / "hanging-bin"
    bin_dir.mkdir()
    marker = tmp_path / "hanging-gpgv.pid"
    hanging = bin_dir / "gpgv"
    hanging.write_text(f"#!/bin/sh\necho $$ > {marker}\nexec sleep 600\n")
    hanging.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(verify, "GPGV_TIMEOUT", 2.0)
    with pytest.raises(VerificationFailed) as failed:
        check_signature(sums_of(images), signature_of(images), keyring, str(images))
    assert str(failed.value) == (f"gpgv did not finish checking {images}/SHA256SUMS.gpg within 2 s")
    pid = int(marker.read_text())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), 30, "gpgv killed")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# find_keyring


def test_find_keyring_prefers_etc(root: Path, key: Key) -> None:
    etc = root / "etc/personalityd/import-pubring.pgp"
    usr = root / "usr/lib/personalityd/import-pubring.pgp"
    assert find_keyring(root) is None
    key.export_public(usr)
    assert find_keyring(root) == str(usr)
    key.export_public(etc)
    assert find_keyring(root) == str(etc)


def test_find_keyring_takes_only_regular_files(root: Path, key: Key) -> None:
    usr = key.export_public(root / "usr/lib/personalityd/import-pubring.pgp")
    (root / "etc/personalityd/import-pubring.pgp").mkdir()
    assert find_keyring(root) == str(usr)
    (root / "etc/personalityd/import-pubring.pgp").rmdir()
    (root / "etc/personalityd/import-pubring.pgp").symlink_to("/nonexistent")
    assert find_keyring(root) == str(usr)
    (root / "etc/personalityd/import-pubring.pgp").unlink()
    (root / "etc/personalityd/import-pubring.pgp").symlink_to(usr)
    assert find_keyring(root) == str(root / "etc/personalityd/import-pubring.pgp")


def test_missing_keyring_message_names_both_paths(root: Path) -> None:
    assert missing_keyring_message(root) == (
        f'images.verify is "signed", but there is no keyring: neither '
        f"{root}/etc/personalityd/import-pubring.pgp nor "
        f"{root}/usr/lib/personalityd/import-pubring.pgp exists (put the signers' public "
        "keys there, as `gpg --export` writes them)"
    )


# The listing format against the real sha256sum


TRICKY_NAMES = ["plain.raw", "a\\b.raw", "new\nline.raw", "carriage\rreturn.raw", " lead.raw",
                "trail .raw", "pers\u00f6nlich.raw"]  # fmt: skip


@pytest.mark.parametrize("binary", [False, True])
def test_parse_reads_what_sha256sum_writes(tmp_path: Path, binary: bool) -> None:
    for number, name in enumerate(TRICKY_NAMES):
        (tmp_path / name).write_bytes(b"content %d" % number)
    sums = write_sha256sums(tmp_path, TRICKY_NAMES, binary=binary).read_bytes()
    listing = parse_sha256sums(sums)
    assert listing == {name: digest_of(tmp_path / name) for name in TRICKY_NAMES}
    assert format_sha256sums(listing, binary=binary) == sums

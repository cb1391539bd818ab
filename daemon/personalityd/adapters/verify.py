"""Verifying image files before they become loop devices: digest, SHA256SUMS, gpgv.

`images.verify` (docs/images.md): under "checksum" the file's SHA-256 must be the one
that the SHA256SUMS beside it lists; under "signed" SHA256SUMS.gpg must also be a good
detached OpenPGP signature of that SHA256SUMS, by a key of the import keyring, the
convention of systemd-importd and systemd-sysupdate.

The caller opens the image, SHA256SUMS and SHA256SUMS.gpg through its ownership-checked
opener and hands over the image's descriptor and the other two as bytes: the digest is read
from the descriptor that becomes the loop device (a file renamed over the entry meanwhile
changes nothing), and what gpgv checks is a private copy of exactly the bytes that are
parsed, so nothing can be swapped between the check and the use.

gpgv runs with a fresh private home (never root's ~/.gnupg), on copies in that directory of
the listing, the signature and the keyring, and it passes only with exit status 0 and both
a GOODSIG and a VALIDSIG status line. gpgv exits 0 for a signature by an expired or revoked
key (EXPKEYSIG/REVKEYSIG instead of GOODSIG), so the status lines are what tell; like apt,
such a signature fails. A SHA256SUMS.gpg holding several signatures passes only if gpgv finds
all of them good (its exit status, which is all systemd looks at): one by a key missing
from the keyring fails it. gpgv 2.2 reads only binary keyrings (an armored one makes it say "No
public key"), so an armored keyring (`gpg --export --armor`) is turned binary with `gpg
--dearmor` first; that takes gpg (package gnupg), a binary keyring only gpgv.

Everything here blocks (a large image is read whole; gpgv may take a while): call it off
the event loop. Reads and hashing release the GIL.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from personalityd.core.sha256sums import Sha256SumsError, expected_digest, parse_sha256sums

SUMS_NAME = "SHA256SUMS"
SIGNATURE_NAME = "SHA256SUMS.gpg"
# Under the root, first match wins (systemd-importd's and systemd-sysupdate's order).
KEYRING_PATHS = (
    "etc/personalityd/import-pubring.pgp",
    "usr/lib/personalityd/import-pubring.pgp",
)
KEYRING_MISSING = (
    'images.verify is "signed", but there is no keyring: neither {0} nor {1} exists (put the '
    "signers' public keys there, as `gpg --export` writes them)"
)
GPGV_TIMEOUT = 30.0
READ_SIZE = 4 << 20
# Digests in messages: enough to tell two apart at a glance.
SHOWN_DIGEST = 16

_DIGEST = re.compile(r"[0-9a-f]{64}")
# gpgv's informational stderr lines, passed over when its reason is looked for.
_INFORMATIONAL = ("Signature made", "using ", "Please remember", "should be the first file")


class VerificationFailed(Exception):
    """An image file that fails `images.verify`; `str()` names the file and what failed."""


def file_digest(fd: int) -> str:
    """SHA-256 (hex) of the whole file behind `fd`, read with pread: the offset stays put."""
    hasher = hashlib.sha256()
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    offset = 0
    while True:
        count = os.preadv(fd, [buffer], offset)
        if count == 0:
            return hasher.hexdigest()
        hasher.update(view[:count])
        offset += count


def check_listed(digest: str, sums: bytes, names: Sequence[str], where: str) -> None:
    """Check that the SHA256SUMS in directory `where` lists the file with this digest.

    `names` are the names the file goes by in `where` (an entry's name, then the name of the
    file a symlink entry points to): the first one listed counts. `where` is the directory
    as the user knows it (with the root prefix); messages name `<where>/SHA256SUMS`.
    """
    if _DIGEST.fullmatch(digest) is None:
        raise ValueError(f"not a lowercase SHA-256 hex digest: {digest!r}")
    if not names:
        raise ValueError("check_listed needs at least one name")
    sums_path = posixpath.join(where, SUMS_NAME)
    try:
        listing = parse_sha256sums(sums)
    except Sha256SumsError as error:
        raise VerificationFailed(f"{sums_path}, {error}") from None
    listed = expected_digest(listing, names)
    if listed is None:
        raise VerificationFailed(f"{' or '.join(names)} is not listed in {sums_path}")
    if listed != digest:
        name = next(name for name in names if name in listing)
        raise VerificationFailed(
            f"{name} does not match its digest in {sums_path} (listed "
            f"{listed[:SHOWN_DIGEST]}…, the file has {digest[:SHOWN_DIGEST]}…)"
        )


def check_signature(sums: bytes, signature: bytes, keyring: str, where: str) -> None:
    """Check that `signature` (SHA256SUMS.gpg) is a good signature of `sums` by a key of
    `keyring` (a path: binary or ASCII-armored OpenPGP keys, or a GnuPG keybox).

    `where` is the directory of SHA256SUMS as the user knows it, for the messages.
    """
    signature_path = posixpath.join(where, SIGNATURE_NAME)
    if not signature:
        raise VerificationFailed(f"{signature_path} is empty")
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise VerificationFailed(
            f"cannot check {signature_path}: gpgv (package gpgv) is not installed, and "
            'images.verify = "signed" needs it'
        )
    keys = _read_keyring(keyring)
    with tempfile.TemporaryDirectory(prefix="personalityd-gpgv-") as home:
        if not _is_binary_keyring(keys):
            keys = _dearmor(keys, keyring, home)
        keyring_copy = _write_private(home, "keyring.pgp", keys)
        sums_copy = _write_private(home, SUMS_NAME, sums)
        signature_copy = _write_private(home, SIGNATURE_NAME, signature)
        argv = [gpgv, "--homedir", home, "--keyring", keyring_copy, "--status-fd", "1",
                signature_copy, sums_copy]  # fmt: skip
        try:
            # stdout carries only the status lines (a detached signature has no data to write).
            proc = _run(argv, home, data=None)
        except subprocess.TimeoutExpired:
            raise VerificationFailed(
                f"gpgv did not finish checking {signature_path} within {GPGV_TIMEOUT:.0f} s"
            ) from None
    status = _status_lines(proc.stdout)
    reason = _failure(status, proc.stderr, keyring)
    if reason is None and proc.returncode != 0:
        reason = _gpg_message(proc.stderr) or f"gpgv exited with status {proc.returncode}"
    if reason is not None:
        raise VerificationFailed(f"{signature_path} does not verify {SUMS_NAME}: {reason}")
    if "GOODSIG" not in status or "VALIDSIG" not in status:
        raise VerificationFailed(
            f"{signature_path} does not verify {SUMS_NAME}: gpgv reported no good signature"
        )


def find_keyring(root: Path) -> str | None:
    """The import keyring under `root`: the first of KEYRING_PATHS that is a regular file."""
    for relative in KEYRING_PATHS:
        path = root / relative
        try:
            if stat.S_ISREG(os.stat(path).st_mode):
                return str(path)
        except OSError:
            continue
    return None


def missing_keyring_message(root: Path) -> str:
    """KEYRING_MISSING for `root`: what the caller reports when find_keyring finds none."""
    return KEYRING_MISSING.format(*(root / relative for relative in KEYRING_PATHS))


def _read_keyring(keyring: str) -> bytes:
    def opener(path: str, flags: int) -> int:
        return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)  # a FIFO must not block us

    try:
        with open(keyring, "rb", opener=opener) as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise VerificationFailed(f"the keyring {keyring} is not a regular file")
            keys = file.read()
    except OSError as error:
        raise VerificationFailed(f"cannot read the keyring {keyring}: {error.strerror}") from None
    if not keys.strip():
        raise VerificationFailed(f"the keyring {keyring} is empty")
    return keys


def _is_binary_keyring(keys: bytes) -> bool:
    """OpenPGP packets (the first byte of a packet has bit 7 set) or a GnuPG keybox (its
    header blob says "KBXf"); anything else is taken for ASCII armor."""
    return bool(keys[0] & 0x80) or keys[8:12] == b"KBXf"


def _dearmor(keys: bytes, keyring: str, home: str) -> bytes:
    gpg = shutil.which("gpg")
    if gpg is None:
        raise VerificationFailed(
            f"the keyring {keyring} is ASCII-armored, and gpgv reads only binary keyrings; "
            "converting it needs gpg (package gnupg), which is not installed: store it binary "
            "(gpg --dearmor, or gpg --export without --armor)"
        )
    argv = [gpg, "--homedir", home, "--no-options", "--batch", "--no-tty", "--quiet", "--dearmor"]
    try:
        proc = _run(argv, home, data=keys)
    except subprocess.TimeoutExpired:
        raise VerificationFailed(
            f"gpg --dearmor did not finish reading the keyring {keyring} within "
            f"{GPGV_TIMEOUT:.0f} s"
        ) from None
    if proc.returncode != 0 or not proc.stdout:
        reason = _gpg_message(proc.stderr) or f"gpg exited with status {proc.returncode}"
        raise VerificationFailed(
            f"the keyring {keyring} is not valid ASCII-armored OpenPGP: {reason}"
        )
    return proc.stdout


def _run(argv: list[str], home: str, *, data: bytes | None) -> subprocess.CompletedProcess[bytes]:
    environment = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "GNUPGHOME": home}
    return subprocess.run(
        argv,
        input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True,
        env=environment,
        timeout=GPGV_TIMEOUT,
        check=False,
    )


def _write_private(directory: str, name: str, content: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)
    return path


def _status_lines(output: bytes) -> dict[str, list[str]]:
    """gpgv's `[GNUPG:] KEYWORD args` lines: keyword -> the argument strings of each."""
    status: dict[str, list[str]] = {}
    for line in output.decode(errors="replace").splitlines():
        prefix, _, rest = line.partition(" ")
        if prefix != "[GNUPG:]":
            continue
        keyword, _, arguments = rest.partition(" ")
        status.setdefault(keyword, []).append(arguments)
    return status


def _failure(status: dict[str, list[str]], stderr: bytes, keyring: str) -> str | None:
    """The reason a signature failed, from the first failing status keyword; None if none."""
    if "NODATA" in status:
        return "it holds no valid OpenPGP data"
    if "NO_PUBKEY" in status:
        key = status["NO_PUBKEY"][0]
        return f"it is signed by key {key}, which is not in the keyring {keyring}"
    described = {
        "BADSIG": "bad signature by {}: SHA256SUMS was changed after it was signed, "
        "or the signature was made for another file",
        "EXPKEYSIG": "signed by {}, whose key has expired",
        "REVKEYSIG": "signed by {}, whose key has been revoked",
        "EXPSIG": "the signature by {} has expired",
    }
    for keyword, template in described.items():
        if keyword in status:
            return template.format(_signer(status[keyword][0]))
    if "ERRSIG" in status:
        return "the signature cannot be checked: " + (_gpg_message(stderr) or "gpgv gave no reason")
    return None


def _signer(arguments: str) -> str:
    """`KEYID user id` of a status line as `user id (key KEYID)`."""
    key, _, user = arguments.partition(" ")
    return f"{user} (key {key})" if user else f"key {key}"


def _gpg_message(stderr: bytes) -> str:
    """gpgv's (or gpg's) first diagnostic line that is not mere information, unprefixed."""
    for line in stderr.decode(errors="replace").splitlines():
        program, colon, message = line.partition(": ")
        message = message.strip()
        if program in ("gpgv", "gpg") and colon and not message.startswith(_INFORMATIONAL):
            return message
    return ""

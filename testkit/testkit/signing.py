"""OpenPGP test keys and SHA256SUMS files, made with the real gpg and sha256sum.

For `images.verify` (docs/images.md): a key signs SHA256SUMS into SHA256SUMS.gpg and
exports its public half as the daemon's import keyring (`import-pubring.pgp`).

Every key has a GnuPG home of its own (never root's ~/.gnupg). gpg 2.2 starts a gpg-agent
for every secret-key operation; it is stopped right after each one with `gpgconf --homedir
HOME --kill all`, which reaches only the agent of that home. `agents_of(home)` is what a test
checks to see that none is left. An agent puts its sockets in the home (`S.gpg-agent`), so a
home's path must stay well under the 108 bytes of a socket address: pytest's `tmp_path` does.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testkit.processes import pids_named, run

# An expired key is made and used at this (faked) time, valid for one day from it.
EXPIRED_KEY_CREATED = "20200101T000000"
EXPIRED_KEY_SIGNS = "20200101T010000"
SUMS_NAME = "SHA256SUMS"


@dataclass(frozen=True)
class Key:
    """An ed25519 signing key without passphrase in its own GnuPG home."""

    home: Path
    fingerprint: str
    name: str
    # GnuPG's --faked-system-time for signing (an expired key signs while it was valid).
    signing_time: str | None = None

    def export_public(self, path: Path, *, armor: bool = False) -> Path:
        """The public key to `path`: binary as `gpg --export` writes it (the form of
        import-pubring.pgp), or ASCII-armored with `armor`."""
        with _agent_stopped(self.home):
            exported = _gpg_bytes(self.home, *(["--armor"] if armor else []), "--export",
                                  self.fingerprint)  # fmt: skip
        if not exported:
            raise AssertionError(f"gpg exported nothing for {self.fingerprint}")
        path.write_bytes(exported)
        return path

    def sign_detached(self, data_path: Path, sig_path: Path, *, armor: bool = False) -> Path:
        """A detached signature of `data_path` to `sig_path` (binary, or armored)."""
        faked = ["--faked-system-time", self.signing_time] if self.signing_time else []
        with _agent_stopped(self.home):
            _gpg(self.home, *faked, *(["--armor"] if armor else []), "--yes",
                 "--local-user", self.fingerprint, "--output", str(sig_path),
                 "--detach-sign", str(data_path))  # fmt: skip
        return sig_path

    def sign_attached(self, data_path: Path, out_path: Path) -> Path:
        """`data_path` signed with the data inside (`gpg --sign`): not a detached signature."""
        with _agent_stopped(self.home):
            _gpg(self.home, "--yes", "--local-user", self.fingerprint, "--output",
                 str(out_path), "--sign", str(data_path))  # fmt: skip
        return out_path

    def sign_sha256sums(self, directory: Path, *, armor: bool = False) -> Path:
        """`directory`/SHA256SUMS signed into `directory`/SHA256SUMS.gpg."""
        return self.sign_detached(directory / SUMS_NAME, directory / f"{SUMS_NAME}.gpg",
                                  armor=armor)  # fmt: skip

    def revoke(self) -> None:
        """Revoke the key with the revocation certificate gpg made with it; export again."""
        certificate = self.home / "openpgp-revocs.d" / f"{self.fingerprint}.rev"
        # gpg writes the certificate with its BEGIN line escaped (":-----BEGIN") so that it
        # is not imported by mistake.
        text = certificate.read_text().replace(":-----BEGIN", "-----BEGIN")
        unescaped = self.home / "revocation.asc"
        unescaped.write_text(text)
        with _agent_stopped(self.home):
            _gpg(self.home, "--import", str(unescaped))


def make_key(home: Path, name: str = "personalityd test", *, expired: bool = False) -> Key:
    """A new ed25519 signing key in GnuPG home `home` (created, mode 0700).

    With `expired`, the key was made in 2020 and expired a day later; its signatures carry
    a time when it was still valid, so gpgv reports EXPKEYSIG (not BADSIG) for them.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)
    created = ["--faked-system-time", EXPIRED_KEY_CREATED] if expired else []
    with _agent_stopped(home):
        _gpg(home, *created, "--passphrase", "", "--quick-gen-key", name, "ed25519", "sign",
             "1d" if expired else "never")  # fmt: skip
        listing = _gpg_bytes(home, "--with-colons", "--list-secret-keys", name).decode()
    fingerprints = [line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")]
    if not fingerprints:
        raise AssertionError(f"gpg made no key for {name!r} in {home}:\n{listing}")
    return Key(home, fingerprints[0], name, EXPIRED_KEY_SIGNS if expired else None)


def write_sha256sums(directory: Path, names: Sequence[str], *, binary: bool = False) -> Path:
    """`directory`/SHA256SUMS listing `names` (files in `directory`), written by `sha256sum`
    itself run in `directory`, so the names are as sha256sum writes them (escaped and all)."""
    listing = subprocess.run(
        ["sha256sum", *(["--binary"] if binary else []), "--", *names],
        cwd=directory,
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout
    path = directory / SUMS_NAME
    path.write_bytes(listing)
    return path


def agents_of(home: Path) -> set[int]:
    """PIDs of live gpg-agent processes started for GnuPG home `home`."""
    markers = {os.fsencode(home), os.fsencode(home.resolve())}
    found = set()
    for pid in pids_named("gpg-agent"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                arguments = f.read().split(b"\0")
        except OSError:
            continue
        if markers.intersection(arguments):
            found.add(pid)
    return found


def _gpg(home: Path, *args: str) -> str:
    return run("gpg", "--homedir", home, "--batch", "--no-tty", "--pinentry-mode", "loopback",
               *args)  # fmt: skip


def _gpg_bytes(home: Path, *args: str) -> bytes:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", *args],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout


@contextmanager
def _agent_stopped(home: Path) -> Iterator[None]:
    """Run gpg operations, then stop the agent they may have started for `home`."""
    try:
        yield
    finally:
        run("gpgconf", "--homedir", home, "--kill", "all")

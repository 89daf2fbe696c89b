"""Make a private CA and a TLS certificate for the SuperLink: the project's one certificate maker.

    python scripts/make_certs.py --out certs --san superlink.example.org --san 203.0.113.10

Writes, into the output folder:
  ca.crt      the CA certificate: give it to every SuperNode and to `flwr` users
  ca.key      the CA's private key (stays here; only needed to sign a new server certificate)
  server.pem  the SuperLink's certificate, signed by the CA
  server.key  the SuperLink's private key

The server certificate names `superlink` (the service name inside compose), `localhost`,
`127.0.0.1` and `::1` (the SuperLink's own SuperExec and a CLI on the same host dial these), and
every extra name or address given with --san (the SuperLink's public DNS name or IP).

Keys are ECDSA P-384 (as strong as RSA 7680, made in a millisecond). Runs wherever the
`cryptography` package is installed, which includes every Flower install and image: Docker
(`docker compose -f docker/compose.certs.yml run --rm certs`, docs/DOCKER.md) and
`scripts/launch_federation.py` use it. A complete set of existing files is kept unless --force
is given, so a rerun never silently replaces a CA the SuperNodes already trust; an incomplete
set is an error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ("superlink", "localhost", "127.0.0.1", "::1")
FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


def san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_usage(*allowed: str) -> x509.KeyUsage:
    flags = (
        "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
        "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
    )
    return x509.KeyUsage(**{flag: flag in allowed for flag in flags})


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bayesfl federation CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage("digital_signature", "key_cert_sign", "crl_sign"), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san_entry(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(key_usage("digital_signature"), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def parse_owner(owner: str) -> tuple[int, int] | None:
    if not owner:
        return None
    uid, _, gid = owner.partition(":")
    return int(uid), int(gid or uid)


def write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def make_certs(
    out: Path,
    names: Iterable[str] = (),
    days: int = 365,
    owner: tuple[int, int] | None = None,
    force: bool = False,
) -> list[str] | None:
    """Write the CA and the server certificate for DEFAULT_NAMES and `names` into `out`; the
    names certified, or None when a complete set was there already and is kept."""
    existing = [f for f in FILES if (out / f).exists()]
    if existing and not force:
        if len(existing) == len(FILES):
            return None
        missing = ", ".join(f for f in FILES if f not in existing)
        raise FileExistsError(f"{out}: incomplete certificates ({missing} missing); use --force")
    names = list(dict.fromkeys([*DEFAULT_NAMES, *names]))
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)  # the SuperLink's user must be able to enter it
    ca_key, ca_cert = make_ca(days)
    key, cert = make_server_cert(ca_key, ca_cert, names, days)
    write(out / "ca.key", key_pem(ca_key), 0o600, None)
    write(out / "ca.crt", cert_pem(ca_cert), 0o644, None)
    write(out / "server.key", key_pem(key), 0o600, owner)
    write(out / "server.pem", cert_pem(cert) + cert_pem(ca_cert), 0o644, None)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output folder")
    parser.add_argument(
        "--san", action="append", default=[],
        help="extra DNS name or IP address for the server certificate (repeat it, or give a "
        "comma-separated list); e.g. the SuperLink's public name",
    )
    parser.add_argument(
        "--owner", default="",
        help="UID[:GID] to own server.key (the SuperLink's user; 49999 in Flower's images). "
        "Needs root. Without it the key belongs to whoever runs this.",
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    parser.add_argument(
        "--force", action="store_true", default=os.environ.get("CERTS_FORCE", "") not in ("", "0"),
        help="replace existing files (also: environment variable CERTS_FORCE=1)",
    )
    args = parser.parse_args(argv)
    extra = [n.strip() for item in args.san for n in item.split(",") if n.strip()]
    try:
        names = make_certs(args.out, extra, args.days, parse_owner(args.owner), args.force)
    except FileExistsError as err:
        print(err, file=sys.stderr)
        return 1
    if names is None:
        print(f"{args.out}: {', '.join(FILES)} already there; kept (use --force to replace)")
    else:
        print(f"{args.out}: CA and server certificate for {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

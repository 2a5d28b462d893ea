"""TLS material for the dev stack's secured Kafka listeners: a throw-away CA and a broker
certificate it signs, made with ``openssl`` (milliseconds; ``keytool`` takes a JVM start per
step). The broker reads a PKCS12 keystore; clients trust ``ca.pem``."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BrokerTls:
    cafile: Path  # what a client trusts
    keystore: Path  # PKCS12: the broker's key and its chain
    password: str


def openssl() -> str | None:
    return shutil.which("openssl")


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr.strip()[-2000:]}")


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (EC P-256, two days): its certificate and key."""
    tool = openssl()
    if tool is None:
        raise RuntimeError("the secured Kafka listeners need `openssl` on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _run(
        tool, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}", "-days", "2",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_broker_tls(directory: Path) -> BrokerTls:
    """A CA, and a broker certificate for 127.0.0.1 and localhost signed by it."""
    tool = openssl()
    assert tool is not None
    ca_cert, ca_key = make_ca(directory, "devstack-ca")
    (directory / "san.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    password = secrets.token_urlsafe(12)
    _run(
        tool, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=localhost",
        cwd=directory,
    )  # fmt: skip
    _run(
        tool, "x509", "-req", "-in", "broker.csr", "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", "broker.pem", "-days", "2", "-extfile", "san.cnf",
        cwd=directory,
    )  # fmt: skip
    _run(
        tool, "pkcs12", "-export", "-in", "broker.pem", "-inkey", "broker.key",
        "-certfile", str(ca_cert), "-out", "broker.p12", "-passout", f"pass:{password}",
        "-name", "broker",
        cwd=directory,
    )  # fmt: skip
    return BrokerTls(ca_cert, directory / "broker.p12", password)

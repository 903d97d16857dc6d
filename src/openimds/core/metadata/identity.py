"""Signed instance identity: AWS's instance-identity document and an audience-bound JWT.

Pure: keys, certificates, views and clocks come in as arguments; nothing here reads a file.

- `identity_document(view, ...)` is AWS's `/latest/dynamic/instance-identity/document`,
  byte-compatible in shape (two-space indent, `" : "` separators, AWS's key order and its
  null keys) so parsers written against EC2 (the `ec2-metadata` package, SDKs) read it.
- `IdentitySigner` signs it three ways, as AWS serves them: `signature` (base64 of the
  RSA-SHA256 signature: `openssl dgst -sha256 -verify`), and `pkcs7` / `rsa2048` (a detached
  PKCS#7 signedData, base64 in 64-character lines without the PEM armour lines:
  `openssl smime -verify -inform PEM -content document -certfile cert`). AWS signs `pkcs7`
  with DSA-SHA1; we use the node's RSA key and SHA-256 for all three (no current library
  writes DSA PKCS#7, and SHA-1 signatures are refused by OpenSSL 3's default level).
- Beyond AWS, whose document is a replayable bearer credential: `IdentitySigner.jwt(claims)`
  is an RS256 JWT bound to an audience and expiring within the hour (`identity_claims`), and
  `IdentitySigner.jwks()` the key set relying parties verify it with.
- `generate_identity(common_name, now)` makes the RSA-2048 key and a self-signed certificate
  (written on first start by `openimds.metadata.identity`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from openimds.core.metadata.ec2 import ami_id
from openimds.core.metadata.view import View

__all__ = [
    "DOCUMENT_VERSION",
    "JWT_MAX_TTL_S",
    "IdentitySigner",
    "generate_identity",
    "identity_claims",
    "identity_document",
]

DOCUMENT_VERSION = "2017-09-30"  # the `version` AWS documents carry
JWT_MAX_TTL_S = 3600
KEY_BITS = 2048
CERT_DAYS = 3650


def _iso(value: str) -> str:
    """The registry's ISO 8601 timestamp in AWS's form (`2016-11-19T16:32:11Z`)."""
    if not value:
        return ""
    try:
        stamp = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def identity_document(view: View, *, region: str, architecture: str) -> bytes:
    """AWS's instance identity document for this instance (see the module docstring)."""
    doc: dict[str, Any] = {
        "accountId": view.project_id,
        "architecture": architecture,
        "availabilityZone": view.availability_zone or "",
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": ami_id(view.image_id),
        "instanceId": f"i-{view.ec2_id:08x}",
        "instanceType": view.flavor,
        "kernelId": None,
        "pendingTime": _iso(view.created_at),
        "privateIp": view.first_ipv4(),
        "ramdiskId": None,
        "region": region,
        "version": DOCUMENT_VERSION,
    }
    return json.dumps(doc, indent=2, separators=(",", " : "), ensure_ascii=False).encode()


def identity_claims(
    view: View, *, audience: str, issuer: str, region: str, now_s: float,
    ttl_s: int = JWT_MAX_TTL_S,
) -> dict[str, Any]:
    """The JWT claims: registered ones plus the instance and its project (GCE-like)."""
    iat = int(now_s)
    return {
        "iss": issuer,
        "aud": audience,
        "sub": view.id,
        "iat": iat,
        "nbf": iat,
        "exp": iat + min(ttl_s, JWT_MAX_TTL_S),
        "instance_id": view.id,
        "instance_name": view.name,
        "ec2_instance_id": f"i-{view.ec2_id:08x}",
        "project_id": view.project_id,
        "availability_zone": view.availability_zone or "",
        "region": region,
    }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


class IdentitySigner:
    """The node's identity key and certificate, and every signature made with them."""

    __slots__ = ("_cert", "_key", "cert_pem", "kid")

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the identity key must be an RSA private key")
        cert = x509.load_pem_x509_certificate(cert_pem)
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey) or \
                public.public_numbers() != key.public_key().public_numbers():
            raise ValueError("the identity certificate does not belong to the identity key")
        self._key = key
        self._cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.kid = _b64url(hashlib.sha256(der).digest()[:16])

    def signature(self, document: bytes) -> bytes:
        """`instance-identity/signature`: base64 RSA-SHA256 (PKCS#1 v1.5), 64-char lines."""
        raw = self._key.sign(document, padding.PKCS1v15(), hashes.SHA256())
        return _lines(base64.b64encode(raw))

    def pkcs7(self, document: bytes) -> bytes:
        """`instance-identity/pkcs7` and `rsa2048`: detached PKCS#7 signedData, the PEM body
        without its BEGIN/END lines (as AWS serves it)."""
        pem = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(document)
            .add_signer(self._cert, self._key, hashes.SHA256())
            .sign(serialization.Encoding.PEM,
                  [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
        )
        lines = [ln for ln in pem.strip().splitlines() if not ln.startswith(b"-----")]
        return b"\n".join(lines)

    def jwt(self, claims: Mapping[str, Any]) -> str:
        """An RS256 JWS compact token over `claims`."""
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                         + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def jwks(self) -> dict[str, Any]:
        """The JSON Web Key Set that verifies `jwt` tokens."""
        numbers = self._key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                          "n": _uint(numbers.n), "e": _uint(numbers.e)}]}


def _lines(data: bytes, width: int = 64) -> bytes:
    return b"\n".join(data[i:i + width] for i in range(0, len(data), width))


def generate_identity(common_name: str, now: datetime.datetime) -> tuple[bytes, bytes]:
    """A new RSA-2048 key and a self-signed certificate for it: (key PEM, cert PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "openimds"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "openimds"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)

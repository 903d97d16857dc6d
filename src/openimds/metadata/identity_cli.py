"""`openimds identity cert|jwks`: what relying parties need to verify a VM's identity.

`cert` prints the PEM certificate that verifies `instance-identity/signature`, `pkcs7` and
`rsa2048` (`openssl smime -verify -inform PEM -content document -certfile cert.pem
-noverify`); `jwks` prints the JSON Web Key Set that verifies the identity JWT. Both make
the key and certificate first if they do not exist yet, exactly as the API's first start.
"""

from __future__ import annotations

import argparse
import json
import sys

from openimds.cli import add_command
from openimds.config import Settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        sub, "identity", _identity,
        "print the certificate (cert) or JWKS (jwks) that verify instance identities",
        formatted=False,
    )
    parser.add_argument("what", choices=("cert", "jwks"), help="cert (PEM) or jwks (JSON)")


def _identity(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: cryptography (~30 ms) is not needed for `identity --help`.
    from openimds.metadata.identity import load_or_create

    signer = load_or_create(settings)
    if args.what == "cert":
        sys.stdout.write(signer.cert_pem.decode("ascii"))
    else:
        sys.stdout.write(json.dumps(signer.jwks(), indent=2) + "\n")
    return 0

"""Drives a tether agent with py-spiffe (the `spiffe` package on PyPI), unmodified.

Usage: workload_client.py MODE EXPECTED_SPIFFE_ID
  MODE "identity": fetch X.509 and JWT SVIDs, validate, check bundles.
  MODE "denied":   expect PermissionDenied (run as a uid with no entry).
The socket comes from SPIFFE_ENDPOINT_SOCKET. Prints one JSON line; exits 1
with the reason on any mismatch.
"""

import json
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import JwtSvid, WorkloadApiClient


def fail(reason):
    print(json.dumps({"ok": False, "reason": reason}))
    sys.exit(1)


def check_identity(client, expected):
    svid = client.fetch_x509_svid()
    if str(svid.spiffe_id) != expected:
        fail(f"x509 spiffe id {svid.spiffe_id} != {expected}")
    leaf = svid.leaf
    ctx = client.fetch_x509_context()
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None:
        fail("no bundle for the SVID's own trust domain")
    # The leaf is signed by one of the bundle's authorities.
    verified = False
    for ca in bundle.x509_authorities:
        try:
            ca.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
            verified = True
        except Exception:  # noqa: BLE001 - try the next authority
            continue
    if not verified:
        fail("leaf not signed by any bundle authority")

    jwt = client.fetch_jwt_svid(audience={"py-audience"})
    if str(jwt.spiffe_id) != expected:
        fail(f"jwt spiffe id {jwt.spiffe_id} != {expected}")
    validated = client.validate_jwt_svid(jwt.token, "py-audience")
    if str(validated.spiffe_id) != expected:
        fail("validated spiffe id differs")

    # Offline validation with the served JWT bundles.
    jwt_bundles = client.fetch_jwt_bundles()
    own = jwt_bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if own is None:
        fail("no JWT bundle for the own trust domain")
    offline = JwtSvid.parse_and_validate(jwt.token, own, {"py-audience"})
    if str(offline.spiffe_id) != expected:
        fail("offline validation gave another spiffe id")

    # The agent must refuse a token for another audience.
    refused = False
    try:
        client.validate_jwt_svid(jwt.token, "someone-else")
    except Exception:  # noqa: BLE001 - py-spiffe raises its own error types
        refused = True
    if not refused:
        fail("agent accepted a token for the wrong audience")
    print(json.dumps({"ok": True, "x509": str(svid.spiffe_id), "jwt": str(jwt.spiffe_id)}))


def check_denied(client):
    try:
        client.fetch_x509_svid()
    except Exception as e:  # noqa: BLE001
        text = str(e)
        if "PERMISSION_DENIED" in text or "permission" in text.lower() or "no identity" in text.lower():
            print(json.dumps({"ok": True, "denied": text}))
            return
        fail(f"unexpected error: {text}")
    fail("an unregistered caller got an SVID")


def main():
    mode, expected = sys.argv[1], sys.argv[2]
    client = WorkloadApiClient()
    try:
        if mode == "identity":
            check_identity(client, expected)
        elif mode == "denied":
            check_denied(client)
        else:
            fail(f"unknown mode {mode}")
    finally:
        client.close()


if __name__ == "__main__":
    main()

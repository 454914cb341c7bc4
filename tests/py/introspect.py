"""A relying party without tether: introspects tokens at tether's RFC 7662
endpoint with Python's standard library only (urllib + ssl), presenting an
X.509-SVID it fetched with py-spiffe.

Usage: introspect.py URL SPIFFE_ID [--no-client-cert]
  The SVID for SPIFFE_ID comes from the Workload API at
  SPIFFE_ENDPOINT_SOCKET (written to a temporary directory as PEM files, as
  a service that only reads files would have them). Reads a JSON list of
  requests on stdin, each {"body": str, "content_type": str or null,
  "method": "POST" by default}, and prints one JSON line:
  {"ok": true, "results": [{"status": int, "headers": {...}, "json": ...}
  or {"error": str}, ...]}.
"""

import json
import os
import ssl
import sys
import tempfile
import urllib.error
import urllib.request

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient


def fail(reason):
    print(json.dumps({"ok": False, "reason": reason}))
    sys.exit(1)


def write_svid(directory, spiffe_id):
    """Writes the SVID for spiffe_id (chain, key) and the trust bundle as PEM."""
    client = WorkloadApiClient()
    try:
        svids = client.fetch_x509_svids()
        svid = next((s for s in svids if str(s.spiffe_id) == spiffe_id), None)
        if svid is None:
            fail(f"no X.509-SVID for {spiffe_id} among {[str(s.spiffe_id) for s in svids]}")
        bundle = client.fetch_x509_context().x509_bundle_set.get_bundle_for_trust_domain(
            svid.spiffe_id.trust_domain
        )
    finally:
        client.close()
    if bundle is None:
        fail("no bundle for the SVID's trust domain")
    paths = {name: os.path.join(directory, name) for name in ("svid.pem", "key.pem", "bundle.pem")}
    with open(paths["svid.pem"], "wb") as f:
        for cert in svid.cert_chain:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["key.pem"], "wb") as f:
        f.write(
            svid.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(paths["bundle.pem"], "wb") as f:
        for ca in bundle.x509_authorities:
            f.write(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def context(paths, client_cert):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The server's certificate is an X.509-SVID: its name is a SPIFFE ID
    # (a URI SAN), it has no DNS name, so there is no hostname to check.
    # The chain is still verified against the trust domain's bundle
    # (CERT_REQUIRED with the bundle as the only CAs); a relying party that
    # wants to pin the server checks the URI SAN of getpeercert() as well.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=paths["bundle.pem"])
    if client_cert:
        ctx.load_cert_chain(certfile=paths["svid.pem"], keyfile=paths["key.pem"])
    return ctx


def send(url, ctx, request):
    body = request.get("body", "").encode()
    headers = {}
    if request.get("content_type") is not None:
        headers["Content-Type"] = request["content_type"]
    req = urllib.request.Request(url, data=body, headers=headers, method=request.get("method", "POST"))
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    except (urllib.error.URLError, OSError) as error:
        return {"error": str(error)}
    result = {"status": status, "headers": {k.lower(): v for k, v in headers.items()}}
    try:
        result["json"] = json.loads(raw)
    except ValueError:
        result["text"] = raw.decode(errors="replace")
    return result


def main():
    if len(sys.argv) < 3:
        fail("usage: introspect.py URL SPIFFE_ID [--no-client-cert]")
    url, spiffe_id = sys.argv[1], sys.argv[2]
    client_cert = "--no-client-cert" not in sys.argv[3:]
    requests = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_svid(directory, spiffe_id)
        ctx = context(paths, client_cert)
        results = [send(url, ctx, request) for request in requests]
    print(json.dumps({"ok": True, "results": results}))


if __name__ == "__main__":
    main()

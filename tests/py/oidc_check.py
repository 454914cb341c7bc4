"""A relying party that knows only an issuer URL, as tests/integration/oidc.rs
drives it: PyJWT's PyJWKClient (nobody here wrote it) fed from the issuer's
OIDC discovery document.

    python oidc_check.py ISSUER CA_PEM LIFESPAN

It fetches ISSUER/.well-known/openid-configuration (urllib, TLS verified
against CA_PEM, the hostname checked), checks the document names ISSUER,
takes its jwks_uri, and builds one PyJWKClient from it, caching the JWKS
for LIFESPAN seconds (a relying party's cache: tether says 300 s, hours
below a key's publication lead with real key lifetimes; a test whose keys
live seconds scales it down). Then it reads one JSON command a line from
stdin and answers each with one JSON line:

    {"token": "...", "aud": "..."}
    -> {"ok": true, "kid": "...", "claims": {...}}
    -> {"ok": false, "kind": "unknown_key" | "invalid" | "connection", "error": "..."}

"unknown_key": the JWKS (fetched again when the cache is stale, or for a
kid it does not hold) has no key for the token's kid. The token must carry
iss == ISSUER and the audience.
"""

import json
import ssl
import sys
import urllib.request

import jwt
from jwt import PyJWKClient
from jwt.exceptions import PyJWKClientConnectionError, PyJWKClientError


def discover(issuer, context):
    url = issuer + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        document = json.load(response)
    if document.get("issuer") != issuer:
        raise SystemExit(f"the discovery document names {document.get('issuer')!r}, not {issuer!r}")
    if "ES256" not in document.get("id_token_signing_alg_values_supported", []):
        raise SystemExit(f"ES256 is not among the algorithms: {document}")
    return document


def client_for(issuer, context, lifespan):
    document = discover(issuer, context)
    client = PyJWKClient(document["jwks_uri"], ssl_context=context, timeout=10, lifespan=lifespan)
    return client, document


def check(client, issuer, command):
    try:
        key = client.get_signing_key_from_jwt(command["token"])
    except PyJWKClientConnectionError as error:
        return {"ok": False, "kind": "connection", "error": str(error)}
    except PyJWKClientError as error:
        return {"ok": False, "kind": "unknown_key", "error": str(error)}
    try:
        claims = jwt.decode(
            command["token"],
            key.key,
            algorithms=["ES256"],
            audience=command["aud"],
            issuer=issuer,
            options={"require": ["exp", "iat", "iss", "sub", "aud"]},
        )
    except jwt.PyJWTError as error:
        return {"ok": False, "kind": "invalid", "error": f"{type(error).__name__}: {error}"}
    return {"ok": True, "kid": key.key_id, "claims": claims}


def main():
    issuer, ca, lifespan = sys.argv[1], sys.argv[2], float(sys.argv[3])
    context = ssl.create_default_context(cafile=ca)
    client, document = client_for(issuer, context, lifespan)
    print(json.dumps({"ready": True, "jwks_uri": document["jwks_uri"]}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        print(json.dumps(check(client, issuer, command)), flush=True)


if __name__ == "__main__":
    main()

"""Bearer-token validation: JWTs against a JWKS, RFC 7662 introspection, the dev issuer."""

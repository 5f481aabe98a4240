"""Who is calling: credentials (signed tokens today) turned into a `Principal` with
scopes, and the checks on it. Transport security (TLS) joins it here."""

"""Who may use the hub: users and roles, API tokens, dashboard sessions,
login rate limiting, and the per-user scope (DAG tags, device groups).

``hub.api.security`` enforces it on every route; ``hub.cli`` manages users
and tokens on the database directly. See docs/security-auth.md.
"""

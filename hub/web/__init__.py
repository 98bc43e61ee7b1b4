"""The dashboard: ``views`` (pages, the trigger action, static files),
``templates/`` (Jinja2, autoescaped), ``static/`` (CSS, the live-update JS)."""

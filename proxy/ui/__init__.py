"""The session browser's static files (`/ui`): index.html, app.css, app.js, icon.svg.

Package data, served by `proxy.routes.ui`; nothing here is Python but this docstring.
"""

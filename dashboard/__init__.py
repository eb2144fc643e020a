"""`fusion serve`: a read-only web dashboard over one federation's common-knowledge store.

A downstream module, like forecasting/ and mechanisms/: it reads the store only through Fusion's public API
(fusion.api: the sandboxed SQL surface of `fusion sql`, and `verify`; the Forecasts page reads a series' releases
with forecasting's own reader, so it draws what forecasts read), and Fusion's core never imports it (the
CLI loads it only for `fusion serve`, so other commands start without the web stack). Pages are rendered on the
server (Jinja2, every value escaped), charts are Vega-Lite specs built with Altair and drawn by vendored vega
bundles, and each page has a JSON twin documented in OpenAPI.
"""

from dashboard.app import create_app
from dashboard.server import ServeOptions, serve

__all__ = ["ServeOptions", "create_app", "serve"]

"""Routing users to portfolio members (the router) and serving them over HTTP."""

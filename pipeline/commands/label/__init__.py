"""`rlhf label`: human feedback in a local web page, turned into reward data.

`store` holds the files and the bookkeeping (no model, no web framework, unit-testable), `server`
the command, the model side and the web app, `static/` the page itself (plain HTML, CSS and JS).
"""

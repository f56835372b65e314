"""The serving wing: the HTTP app (`app`), the API's models (`protocol`), the shared serving logic (`serving`),
its routers, the generation queue, admission, limits, webhooks and the web page; `ray/` serves the same app
through Ray Serve. The core of `sdaot.runtime` knows nothing of HTTP; this wing reads it."""

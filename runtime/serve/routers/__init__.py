"""The HTTP routes, one router per area; each route parses, calls `serving`/`GenerationQueue`, answers."""

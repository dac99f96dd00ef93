"""HTTP routes, thin: parse the body, hand it to a service, return what it gives."""

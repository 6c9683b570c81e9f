"""A demo web portal: an OpenID Connect relying party that signs users in through an
issuer's hosted page and calls an API through the gateway with their access token.

It uses nothing of ``authserver`` or ``gateway``: it talks to its issuer over HTTP, as
it would to Okta, Keycloak or Auth0.
"""

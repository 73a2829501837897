"""Browser tests (README.md): a package, so that ``scope="package"`` fixtures end with them."""

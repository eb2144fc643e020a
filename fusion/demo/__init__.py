"""The demo federation: real public weather data (`data`) laid out as institutions' feeds with keys, config and
a store (`federation.build_demo`), used by `fusion demo`, the docs and the tests."""

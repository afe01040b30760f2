"""The embedded demo's assets (assets/tiny/) and the programs that build them, and the real experiment's offline
stand-ins; each program runs as a module from the repository root (python3 -m assets.build_tiny,
assets.generate_tiny_data, assets.hub_standins)."""

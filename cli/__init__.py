"""Command-line interface: thin click layers over the library's configs."""

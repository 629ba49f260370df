"""The ``stockade`` command: a thin shell over the packages; one module per subcommand."""

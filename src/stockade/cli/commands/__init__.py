"""One module per subcommand: HELP, DESCRIPTION, add_arguments(parser) and main(args)."""

"""One module per `sharedllm` subcommand: HELP, configure(parser), run(args) -> dict, optional render(dict)."""

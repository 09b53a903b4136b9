"""The faces of the tool: `cli` (the `rlhf` entry point) and one module per command. Commands
may import the library (`pipeline`) and the stage list (`stages`); nothing below imports them."""

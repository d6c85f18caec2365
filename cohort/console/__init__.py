"""What a person sees: the display modes, the plan's text, running a command (exit codes, Ctrl-C)."""
